"""One static HTML page over the outputs of a `clipviz explain` or `clipviz concepts` run.

The page works from the file system with no network: the run's records are embedded as JSON
and a small inline script draws the grid — one card per (image, prompt, method) overlay —
with filters by prompt and by method, sorting by the model's probability, pagination (so a
10,000-image run opens fast; images load lazily) and a large view of one image: the original,
every method's overlay and heatmap for each prompt, the comparison sheet and, for
Grad-ECLIP, each prompt's token weights. Failures are listed with their reasons.

The page's style sheet and script are in `report_assets.py`; what every report page shares
about a run folder (safe paths, links, records, thumbnails), in `report_files.py`.
"""

from __future__ import annotations

import html
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

from ..errors import ClipvizError
from ..files import write_text_atomic
from .manifest import MANIFEST
from .report_assets import SCRIPT, STYLE
from .report_files import (
    THUMBS,
    _latest_records,
    _original,
    _real_inside,
    embed_json,
    make_thumbnail,
    read_run_info,
)
from .run_json import run_kind

PAGE_SIZE = 60
MALFORMED = "its record is not one clipviz writes"


class _Outside(Exception):
    """A record's file that resolves to a place outside the run folder."""


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
