"""One static HTML page over the outputs of a `clipviz segment` run: the classes with their
colours and how much of the images each covers, a grid of label overlays (each with its
legend) that a class filter narrows to the images holding that class, a large view per image
(the photo, the overlay, the classes by share), and the failures.

Every name on the page (class names, file names, errors) comes from files that may come from
someone else: the records are embedded as JSON that no text can break out of, the script
writes them as text only, and every file shown must lie inside the run folder.
"""

from __future__ import annotations

import html
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

from ..files import write_text_atomic
from ..segment.outputs import palette
from .report import MALFORMED
from .report_files import (
    THUMBS,
    _latest_records,
    _original,
    _real_inside,
    embed_json,
    make_thumbnail,
    read_run_info,
)

PAGE_SIZE = 60
STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #222; }
h1 { font-size: 20px; } h2 { font-size: 15px; margin: 24px 0 6px; }
.meta { color: #555; } .failed { color: #b00; }
#controls { display: flex; flex-wrap: wrap; gap: 12px; align-items: center; margin: 12px 0; }
.grid { display: flex; flex-wrap: wrap; gap: 10px; }
figure { margin: 0; width: 260px; cursor: pointer; }
figure img { width: 260px; height: auto; border: 1px solid #ddd; background: #f4f4f4; }
figcaption { font-size: 12px; word-break: break-word; }
table { border-collapse: collapse; } td, th { padding: 2px 8px; border-bottom: 1px solid #eee; }
.swatch { display: inline-block; width: 12px; height: 12px; border: 1px solid #000; }
#view { position: fixed; inset: 0; background: rgba(255,255,255,.97); overflow: auto;
        padding: 24px; } #view[hidden] { display: none; }
#view img { max-width: 640px; border: 1px solid #ddd; margin-right: 10px; }
"""
SCRIPT = """
const data = JSON.parse(document.getElementById('data').textContent);
const $ = (id) => document.getElementById(id);
let page = 0;
function swatch(c) {
  const s = document.createElement('span'); s.className = 'swatch';
  s.style.background = 'rgb(' + data.colours[c].join(',') + ')'; return s;
}
const legend = $('legend');
data.classes.forEach((names, c) => {
  const row = legend.insertRow(), n = data.totals[c];
  row.insertCell().append(swatch(c));
  row.insertCell().textContent = c;
  row.insertCell().textContent = names.join(', ');
  row.insertCell().textContent = n ? n.images : 0;
  row.insertCell().textContent = n ? (100 * n.share).toFixed(1) + ' %' : '';
  if (n) { const o = document.createElement('option'); o.value = c;
    o.textContent = c + ' ' + names[0]; $('klass').appendChild(o); }
});
function chosen() {
  const k = $('klass').value;
  return data.images.filter(im => k === '' || k in im.shares);
}
function figure(src, caption) {
  const f = document.createElement('figure'), img = document.createElement('img');
  img.loading = 'lazy'; img.src = src; img.alt = caption;
  const c = document.createElement('figcaption'); c.textContent = caption;
  f.append(img, c); return f;
}
function named(im) {
  return Object.entries(im.shares).sort((a, b) => b[1] - a[1])
    .map(([c, s]) => data.classes[c][0] + ' ' + (100 * s).toFixed(1) + '%');
}
function draw() {
  const shown = chosen(), pages = Math.max(1, Math.ceil(shown.length / data.pageSize));
  page = Math.min(page, pages - 1);
  const grid = $('grid'); grid.replaceChildren();
  for (const im of shown.slice(page * data.pageSize, (page + 1) * data.pageSize)) {
    const f = figure(im.thumb, im.key + ': ' + named(im).slice(0, 3).join(', '));
    f.onclick = () => show(im); grid.appendChild(f);
  }
  $('count').textContent = shown.length + ' images';
  $('page').textContent = 'page ' + (page + 1) + ' of ' + pages;
  $('prev').disabled = page === 0; $('next').disabled = page >= pages - 1;
}
function show(im) {
  const view = $('view'); view.replaceChildren();
  const close = document.createElement('button'); close.textContent = 'close';
  close.id = 'close'; close.onclick = () => { view.hidden = true; };
  const h = document.createElement('h2'); h.textContent = im.key;
  view.append(close, h);
  for (const [src, alt] of [[im.original, 'original'], [im.overlay, 'labels']]) {
    if (!src) continue;
    const i = document.createElement('img'); i.src = src; i.alt = alt; view.appendChild(i);
  }
  const table = document.createElement('table');
  for (const [c, s] of Object.entries(im.shares).sort((a, b) => b[1] - a[1])) {
    const row = table.insertRow(); row.insertCell().append(swatch(c));
    row.insertCell().textContent = data.classes[c].join(', ');
    row.insertCell().textContent = (100 * s).toFixed(1) + ' %';
  }
  view.appendChild(table); view.hidden = false; view.scrollTop = 0;
}
$('klass').onchange = () => { page = 0; draw(); };
$('prev').onclick = () => { page -= 1; draw(); }; $('next').onclick = () => { page += 1; draw(); };
draw();
"""


def _image(rec: dict[str, Any], root: str, classes: int) -> dict[str, Any]:
    """One record's overlay (a path relative to `root`) and its class shares, checked; a
    file outside `root` raises `LookupError`, a record of the wrong shape another error."""
    output, name = rec["output"], rec["files"]["overlay"]
    if not isinstance(output, str) or not isinstance(name, str):
        raise TypeError(name)
    if os.sep in name or name in ("", ".", ".."):
        raise TypeError(name)
    path = _real_inside(root, os.path.join(root, output, name))
    if path is None or path == root:
        raise LookupError(os.path.join(output, name))
    shares = {str(int(c)): float(s) for c, s in rec.get("shares", {}).items()}
    if any(not 0 <= int(c) < classes for c in shares):
        raise ValueError(shares)
    return {"key": output, "overlay": path[len(root) + 1 :], "shares": shares}


def build_segment_report(
    run_dir: Path, target: Path, warn: Callable[[str], None] | None = None
) -> Path:
    """Write `target`, the page over the segment run in `run_dir` (see the module)."""
    root = os.path.realpath(run_dir)
    run = read_run_info(run_dir)
    lines = run.get("classes")
    classes = [[str(n) for n in line] for line in lines] if isinstance(lines, list) else []
    records = _latest_records(run_dir)
    failed = [r for r in records if r.get("status") == "failed"]
    base = os.path.relpath(run_dir, target.parent)
    prefix = "" if base == "." else f"{Path(base).as_posix()}/"
    thumbs = _real_inside(root, os.path.join(root, THUMBS))
    images, left_out = [], []
    for rec in records:
        if rec.get("status") not in ("ok", "skipped"):
            continue
        try:
            image = _image(rec, root, len(classes))
        except LookupError as e:
            left_out.append((str(rec.get("input")), f"{e} is outside the run folder"))
            continue
        except (AttributeError, KeyError, TypeError, ValueError):
            left_out.append((str(rec.get("input")), MALFORMED))
            continue
        overlay = image["overlay"]
        small = f"{THUMBS}/{overlay}.jpg"
        folder = _real_inside(root, os.path.dirname(os.path.join(root, small)))
        made = (
            thumbs is not None
            and folder is not None
            and make_thumbnail(Path(root, overlay), Path(folder, os.path.basename(small)))
        )
        image["overlay"] = quote(os.fsencode(prefix + overlay))
        image["thumb"] = quote(os.fsencode(prefix + small)) if made else image["overlay"]
        image["original"] = _original(rec, target.parent)
        images.append(image)
    totals: dict[str, dict[str, float]] = {}
    for image in images:
        for c, share in image["shares"].items():
            total = totals.setdefault(c, {"images": 0, "share": 0.0})
            total["images"] += 1
            total["share"] += share / len(images)
    if warn:
        for source, reason in left_out:
            warn(f"left out of the report: {source}: {reason}")
    payload = {"pageSize": PAGE_SIZE, "classes": classes, "images": images, "totals": totals,
               "colours": palette(len(classes)).tolist()}  # fmt: skip
    model: dict[str, Any] = run["model"] if isinstance(run.get("model"), dict) else {}
    parts = [
        "<!doctype html><meta charset='utf-8'><title>clipviz segment report</title>",
        f"<style>{STYLE}</style><h1>clipviz segment report — {html.escape(run_dir.name)}</h1>",
        "<p class='meta'>"
        + html.escape(
            f"model {model.get('model')} ({model.get('pretrained') or model.get('weights')}), "
            f"method {run.get('method')}, preset {run.get('preset') or 'none'}, "
            f"{len(classes)} classes, {len(images)} images, {len(failed)} failed"
        )
        + "</p>",
        "<h2>Classes</h2><table><thead><tr><th></th><th>label</th><th>names</th>"
        "<th>images</th><th>mean share</th></tr></thead><tbody id='legend'></tbody></table>",
        "<div id='controls'><label>class <select id='klass'><option value=''>all</option>"
        "</select></label><span id='count'></span><button id='prev'>previous</button>"
        "<span id='page'></span><button id='next'>next</button></div>",
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
