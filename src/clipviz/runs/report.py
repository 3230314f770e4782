"""One static HTML page over the outputs of a `clipviz explain` or `clipviz concepts` run.

The page works from the file system with no network: the run's records are embedded as JSON
and a small inline script draws the grid — one card per (image, prompt, method) overlay —
with filters by prompt and by method, sorting by the model's probability, pagination (so a
10,000-image run opens fast; images load lazily) and a large view of one image: the original,
every method's overlay and heatmap for each prompt, the comparison sheet and, for
Grad-ECLIP, each prompt's token weights. Failures are listed with their reasons.
"""

from __future__ import annotations

import html
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

from ..errors import ClipvizError
from ..files import atomic_path, write_text_atomic
from .manifest import MANIFEST, latest_records
from .run_json import run_kind

PAGE_SIZE = 60
THUMBS = "report-thumbs"  # the grid's small copies of the overlays, inside the run folder
THUMB_SIDE = 440  # px: sharp at the grid's 220 px on a high-density screen
MALFORMED = "its record is not one clipviz writes"
STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #222; }
h1 { font-size: 20px; } h2 { font-size: 15px; margin: 24px 0 6px; }
.meta { color: #555; } .failed { color: #b00; }
#controls { display: flex; flex-wrap: wrap; gap: 12px; align-items: center; margin: 12px 0; }
.grid { display: flex; flex-wrap: wrap; gap: 10px; }
figure { margin: 0; width: 220px; cursor: pointer; }
figure img { width: 220px; height: auto; border: 1px solid #ddd; background: #f4f4f4; }
figcaption { font-size: 12px; word-break: break-word; } .top { font-weight: bold; }
table { border-collapse: collapse; } td, th { padding: 2px 8px; border-bottom: 1px solid #eee; }
#view { position: fixed; inset: 0; background: rgba(255,255,255,.97); overflow: auto;
        padding: 24px; } #view[hidden] { display: none; }
#view .row { display: flex; flex-wrap: wrap; gap: 10px; margin: 6px 0 14px; }
#view img { max-width: 320px; border: 1px solid #ddd; } #view img.sheet { max-width: 100%; }
.tokens span { padding: 1px 3px; border-radius: 3px; }
"""
SCRIPT = """
const data = JSON.parse(document.getElementById('data').textContent);
const $ = (id) => document.getElementById(id);
let page = 0;
function option(select, values) {
  for (const v of values) { const o = document.createElement('option'); o.value = v;
    o.textContent = v; select.appendChild(o); }
}
option($('prompt'), data.prompts); option($('method'), data.methods);
function chosen() {
  const p = $('prompt').value, m = $('method').value, s = $('sort').value;
  let cards = data.cards.filter(c => (p === '' || c.prompt === p) && (m === '' || c.method === m));
  if (s === 'p-desc') cards = cards.slice().sort((a, b) => b.p - a.p);
  if (s === 'p-asc') cards = cards.slice().sort((a, b) => a.p - b.p);
  return cards;
}
function figure(src, caption, top) {
  const f = document.createElement('figure'), img = document.createElement('img');
  img.loading = 'lazy'; img.src = src; img.alt = caption;
  const c = document.createElement('figcaption'); c.textContent = caption;
  if (top) c.className = 'top';
  f.append(img, c); return f;
}
function draw() {
  const cards = chosen(), pages = Math.max(1, Math.ceil(cards.length / data.pageSize));
  page = Math.min(page, pages - 1);
  const grid = $('grid'); grid.replaceChildren();
  for (const c of cards.slice(page * data.pageSize, (page + 1) * data.pageSize)) {
    const f = figure(c.thumb, c.caption, c.top);
    f.dataset.image = c.image; f.onclick = () => show(c.image); grid.appendChild(f);
  }
  $('count').textContent = cards.length + ' overlays';
  $('page').textContent = 'page ' + (page + 1) + ' of ' + pages;
  $('prev').disabled = page === 0; $('next').disabled = page >= pages - 1;
}
function show(key) {
  const rec = data.images[key], view = $('view'); view.replaceChildren();
  const close = document.createElement('button'); close.textContent = 'close';
  close.id = 'close'; close.onclick = () => { view.hidden = true; };
  const h = document.createElement('h2'); h.textContent = key;
  view.append(close, h);
  if (rec.original) view.appendChild(figure(rec.original, 'original'));
  if (rec.sheet) { const s = document.createElement('img'); s.src = rec.sheet;
    s.className = 'sheet'; s.alt = 'comparison'; view.appendChild(s); }
  for (const p of rec.prompts) {
    const t = document.createElement('h2'); t.textContent = p.prompt + (p.p === null ? ''
      : ' — p = ' + p.p.toFixed(3)); view.appendChild(t);
    const row = document.createElement('div'); row.className = 'row';
    for (const f of p.files) row.appendChild(figure(f.src, f.caption));
    view.appendChild(row);
    if (p.tokens) { const q = document.createElement('p'); q.className = 'tokens';
      q.textContent = 'text side: ';
      for (const [tok, w] of p.tokens) { const s = document.createElement('span');
        s.textContent = tok; s.title = w.toFixed(3);
        s.style.background = 'rgba(220, 40, 40, ' + (w / p.tokenMax).toFixed(2) + ')';
        q.append(s, ' '); }
      view.appendChild(q); }
  }
  view.hidden = false; view.scrollTop = 0;
}
for (const id of ['prompt', 'method', 'sort']) $(id).onchange = () => { page = 0; draw(); };
$('prev').onclick = () => { page -= 1; draw(); }; $('next').onclick = () => { page += 1; draw(); };
draw();
"""


def _latest_records(run_dir: Path) -> list[dict[str, Any]]:
    return sorted(latest_records(run_dir).values(), key=lambda r: str(r.get("output", "")))


def embed_json(payload: Any) -> str:
    """`payload` as JSON to put inside a page's `<script>` element: `<`, `>` and `&` are
    written as `\\u003c`, `\\u003e`, `\\u0026`, so no text in it (`</script>`, `<!--`) can
    end the element or change how the HTML parser reads it; JSON.parse reads them back."""
    text = json.dumps(payload, ensure_ascii=False)
    for char, escape in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026")):
        text = text.replace(char, escape)
    return text


def inside(root: Path, *parts: Any) -> Path | None:
    """`root/parts…` with every symbolic link resolved, or None when that is not inside
    `root` (an absolute part, `..`, a link pointing elsewhere, or a part that is not a
    string): a run folder may come from someone else, and its records are not trusted."""
    if not all(isinstance(p, str) for p in parts):
        return None
    try:
        base = root.resolve()
        path = base.joinpath(*parts).resolve()
    except (OSError, RuntimeError, ValueError):  # a link loop, a NUL in a name
        return None
    return path if path.is_relative_to(base) else None


def read_run_info(run_dir: Path) -> dict[str, Any]:
    """`run.json` of a run folder, or {} when it is missing or not a JSON object."""
    try:
        run = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return run if isinstance(run, dict) else {}


class _Outside(Exception):
    """A record's file that resolves to a place outside the run folder."""


def _real_inside(root: str, path: str) -> str | None:
    """`path` with its links resolved when that is inside the resolved folder `root`."""
    try:
        real = os.path.realpath(path)
    except (OSError, ValueError):  # a NUL in a name
        return None
    return real if real == root or real.startswith(root + os.sep) else None


def _located(root: str, rec: dict[str, Any]) -> dict[str, str]:
    """Each file of a record (overlays, heatmaps, the comparison sheet) by its name, as a
    path relative to the resolved run folder `root`; `_Outside` names the first that is not
    inside it."""
    output = rec["output"]
    if not isinstance(output, str):
        raise TypeError(output)
    folder = _real_inside(root, os.path.join(root, output))
    if folder is None:
        raise _Outside(output)
    names = [name for _, _, name, _ in _files(rec)]
    if "comparison.png" in rec.get("outputs", []):
        names.append("comparison.png")
    located = {}
    for name in names:
        if not isinstance(name, str):
            raise TypeError(name)
        joined = os.path.join(folder, name)
        # a plain name in a resolved folder is inside unless it is a link: one lstat, not a
        # walk of the whole path (a 10,000-image run has 100,000 files)
        plain = os.sep not in name and name not in ("", ".", "..") and not os.path.islink(joined)
        path = joined if plain else _real_inside(root, joined)
        if path is None or path == root:
            raise _Outside(os.path.join(output, name))
        located[name] = path[len(root) + 1 :]
    return located


def _inside_records(
    root: str, records: list[dict[str, Any]]
) -> tuple[dict[str, dict[str, str]], list[dict[str, Any]], list[tuple[str, str]]]:
    """Of `records`, those whose files are all inside `root` with their files (`_located`,
    by the record's output), and (input, reason) of the others."""
    located, kept, left_out = {}, [], []
    for rec in records:
        try:
            files = _located(root, rec)
        except _Outside as e:
            left_out.append((str(rec.get("input")), f"{e} is outside the run folder"))
        except (AttributeError, KeyError, TypeError, ValueError):
            left_out.append((str(rec.get("input")), MALFORMED))
        else:
            located[rec["output"]] = files
            kept.append(rec)
    return located, kept, left_out


def build_report(
    run_dir: str | os.PathLike[str],
    out: str | os.PathLike[str] | None = None,
    warn: Callable[[str], None] | None = None,
) -> Path:
    """Write `RUN_DIR/report.html` (or `out`) over an explain or concepts run: the grid of
    overlays with filters, sorting and pages, a large view per image, and the failures (over
    a segment run: `build_segment_report`'s page).

    Every file the page shows or the report writes stays inside the run folder: a record
    whose files are elsewhere (an absolute path, `..`, a link out) is left out, listed on the
    page and passed to `warn`.
    """
    run_dir = Path(run_dir)
    if not (run_dir / MANIFEST).is_file():
        raise ClipvizError(
            f"{run_dir} has no {MANIFEST}; pass the `out` folder of a `clipviz explain` run"
        )
    target = Path(out) if out is not None else run_dir / "report.html"
    kind = run_kind(run_dir)
    if kind == "segment_shards":
        raise ClipvizError(
            f"{run_dir} is a segment run over shards, which has no report page; read its "
            "labels and class shares in shards/*.tar and shards/*.parquet"
        )
    if kind == "segment":
        from .segment_report import build_segment_report

        return build_segment_report(run_dir, target, warn)
    root = os.path.realpath(run_dir)
    run = read_run_info(run_dir)
    records = _latest_records(run_dir)
    located, ok, left_out = _inside_records(
        root, [r for r in records if r.get("status") in ("ok", "skipped")]
    )
    failed = [r for r in records if r.get("status") == "failed"]
    base = os.path.relpath(run_dir, target.parent)
    prefix = "" if base == "." else f"{Path(base).as_posix()}/"
    thumb_dirs: dict[str, str | None] = {}  # where thumbnails go -> that folder resolved
    thumbs_inside = _real_inside(root, os.path.join(root, THUMBS)) is not None
    if not thumbs_inside and warn:
        warn(f"{run_dir / THUMBS} points outside the run folder; the grid shows the overlays")

    def src(rec: dict[str, Any], name: str) -> str:
        # percent-encoded bytes: any file name (UTF-8 or not) resolves to its file
        return quote(os.fsencode(prefix + located[rec["output"]][name]))

    def thumb(rec: dict[str, Any], name: str) -> str:
        """The grid's small copy of an overlay (made once, remade when the overlay changes),
        written only inside the run folder."""
        small = f"{THUMBS}/{located[rec['output']][name]}.jpg"
        folder = os.path.dirname(os.path.join(root, small))
        if folder not in thumb_dirs:
            thumb_dirs[folder] = _real_inside(root, folder) if thumbs_inside else None
        real = thumb_dirs[folder]
        made = real is not None and make_thumbnail(
            Path(root, located[rec["output"]][name]), Path(real, os.path.basename(small))
        )
        return quote(os.fsencode(prefix + small)) if made else src(rec, name)

    payload = _payload(ok, src, target.parent, thumb, left_out)
    if warn:
        for source, reason in left_out:
            warn(f"left out of the report: {source}: {reason}")
    model: dict[str, Any] = run["model"] if isinstance(run.get("model"), dict) else {}
    methods = run.get("methods") or ([run["method"]] if run.get("method") else [])
    methods = methods if isinstance(methods, list) else [methods]
    parts = [
        "<!doctype html><meta charset='utf-8'><title>clipviz report</title>",
        f"<style>{STYLE}</style><h1>clipviz report — {html.escape(run_dir.name)}</h1>",
        "<p class='meta'>"
        + html.escape(
            f"model {model.get('model')} ({model.get('pretrained') or model.get('weights')}), "
            f"methods {', '.join(map(str, methods))}, {len(payload['images'])} images, "
            f"{len(failed)} failed"
        )
        + "</p>",
        "<div id='controls'><label>prompt <select id='prompt'><option value=''>all</option>"
        "</select></label><label>method <select id='method'><option value=''>all</option>"
        "</select></label><label>sort <select id='sort'><option value='file'>by image</option>"
        "<option value='p-desc'>probability, highest first</option><option value='p-asc'>"
        "probability, lowest first</option></select></label><span id='count'></span>"
        "<button id='prev'>previous</button><span id='page'></span>"
        "<button id='next'>next</button></div>",
        "<div id='grid' class='grid'></div><div id='view' hidden></div>",
    ]
    for title, rows in (("Failed inputs", [(r.get("input"), r.get("error")) for r in failed]),
                        ("Left out of the report", left_out)):  # fmt: skip
        if rows:
            parts.append(f"<h2 class='failed'>{title}</h2><table>")
            parts += [
                f"<tr><td>{html.escape(str(source))}</td>"
                f"<td class='failed'>{html.escape(str(reason))}</td></tr>"
                for source, reason in rows
            ]
            parts.append("</table>")
    parts.append(f"<script id='data' type='application/json'>{embed_json(payload)}</script>")
    parts.append(f"<script>{SCRIPT}</script>")
    write_text_atomic(target, "\n".join(parts) + "\n")
    return target


def make_thumbnail(source: Path, small: Path, side: int = THUMB_SIDE) -> bool:
    """A JPEG of `source` at most `side` px on its long side, unless a current one exists;
    False when `source` cannot be read as an image."""
    from PIL import Image

    try:
        if small.is_file() and small.stat().st_mtime >= source.stat().st_mtime:
            return True
        with Image.open(source) as im:
            im.thumbnail((side, side))
            small.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(small) as tmp, open(tmp, "wb") as f:
                im.convert("RGB").save(f, format="JPEG", quality=85)
    except (OSError, ValueError, Image.DecompressionBombError):
        return False  # the grid falls back to the overlay itself
    return True


def _payload(
    ok: list[dict[str, Any]],
    src: Any,
    page_dir: Path,
    thumb: Any = None,
    left_out: list[tuple[str, str]] | None = None,
) -> dict[str, Any]:
    """The grid's cards and each image's large view, as the page's script reads them; a
    record of the wrong shape is left out (its input and why appended to `left_out`)."""
    cards: list[dict[str, Any]] = []
    images: dict[str, Any] = {}
    prompts: dict[str, None] = {}
    methods: dict[str, None] = {}
    for rec in ok:
        try:
            key, rec_cards, view = _entry(rec, src, page_dir, thumb)
        except (AttributeError, KeyError, TypeError, ValueError):
            if left_out is not None:
                left_out.append((str(rec.get("input")), MALFORMED))
            continue
        cards += rec_cards
        images[key] = view
        prompts.update(dict.fromkeys(p["prompt"] for p in view["prompts"]))
        methods.update(dict.fromkeys(c["method"] for c in rec_cards))
    return {
        "pageSize": PAGE_SIZE,
        "prompts": list(prompts),
        "methods": [m for m in methods if m],
        "cards": cards,
        "images": images,
    }


def _entry(
    rec: dict[str, Any], src: Any, page_dir: Path, thumb: Any
) -> tuple[str, list[dict[str, Any]], dict[str, Any]]:
    """One record's key, grid cards and large view; numbers are checked to be numbers."""
    probs = {str(k): float(v) for k, v in rec.get("probs", {}).items()}
    key = str(rec["output"])
    tokens = rec.get("text_importance", {})
    view: dict[str, Any] = {"original": _original(rec, page_dir), "sheet": None, "prompts": []}
    if "comparison.png" in rec.get("outputs", []):
        view["sheet"] = src(rec, "comparison.png")
    cards: list[dict[str, Any]] = []
    by_prompt: dict[str, list[dict[str, str]]] = {}
    for prompt, kind, name, method in _files(rec):
        prompt, method = str(prompt), str(method)
        caption = f"{prompt} — {method}" if method else prompt
        if kind == "overlay":
            p = probs.get(prompt)
            cards.append({
                "image": key, "prompt": prompt, "method": method, "p": p,
                "overlay": src(rec, name), "top": prompt == rec.get("top"),
                "thumb": thumb(rec, name) if thumb else src(rec, name),
                "caption": f"{key}: {caption}" + (f" — p = {p:.3f}" if p is not None else ""),
            })  # fmt: skip
        by_prompt.setdefault(prompt, []).append({"src": src(rec, name),
                                                 "caption": f"{caption} — {kind}"})  # fmt: skip
    for prompt, files in by_prompt.items():
        entry: dict[str, Any] = {"prompt": prompt, "p": probs.get(prompt), "files": files}
        for weights in tokens.values():
            if prompt in weights:
                entry["tokens"] = [(str(t), float(w)) for t, w in weights[prompt]]
                entry["tokenMax"] = max((w for _, w in entry["tokens"]), default=0.0) or 1.0
        view["prompts"].append(entry)
    return key, cards, view


def page_link(path: Path, page_dir: Path) -> str:
    """`path` relative to a page in `page_dir`, percent-encoded bytes: any file name (UTF-8
    or not) resolves to its file."""
    return quote(os.fsencode(Path(os.path.relpath(path.resolve(), page_dir.resolve())).as_posix()))


def _original(rec: dict[str, Any], page_dir: Path) -> str | None:
    """A link to the input image when it is a file on this machine (not inside a shard)."""
    path = Path(str(rec.get("input", "")))
    return page_link(path, page_dir) if path.is_file() else None


def _files(rec: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(prompt, kind, file, method) of a record's overlays and heatmaps, from its
    `prompt_files` (method empty when one ran); older records are read by file name."""
    if "prompt_files" in rec:
        out = []
        for prompt, files in rec["prompt_files"].items():
            for label, name in files.items():
                method, _, kind = label.rpartition(".")
                out.append((prompt, kind, name, method))
        return out
    from ..render import prompt_slugs

    probs: dict[str, float] = rec.get("probs", {})
    slug_to_prompt = dict(zip(prompt_slugs(list(probs)), probs, strict=True))
    found = []
    for name in rec.get("outputs", []):
        for kind in ("overlay", "heatmap"):
            if name.endswith(f".{kind}.png"):
                prompt = slug_to_prompt.get(name.split(".")[0], name)
                found.append((prompt, kind, name, ""))
    return found
