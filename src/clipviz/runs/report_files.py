"""What every report page shares about a run folder: reading its `run.json` and the
manifest's latest records, keeping every file a page links to or writes inside the folder (a
run folder may come from someone else, and its records are not trusted), links as
percent-encoded bytes, JSON embedded safely in a page's `<script>`, and the grid's thumbnails.
`report.py` (the explain and concepts page), `segment_report.py`, `shard_report.py` and
`eval_report.py` build their pages on it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any
from urllib.parse import quote

from ..files import atomic_path
from .manifest import latest_records

THUMBS = "report-thumbs"  # the grid's small copies of the overlays, inside the run folder
THUMB_SIDE = 440  # px: sharp at the grid's 220 px on a high-density screen


def read_run_info(run_dir: Path) -> dict[str, Any]:
    """`run.json` of a run folder, or {} when it is missing or not a JSON object."""
    try:
        run = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return run if isinstance(run, dict) else {}


def _latest_records(run_dir: Path) -> list[dict[str, Any]]:
    return sorted(latest_records(run_dir).values(), key=lambda r: str(r.get("output", "")))


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


def _real_inside(root: str, path: str) -> str | None:
    """`path` with its links resolved when that is inside the resolved folder `root`."""
    try:
        real = os.path.realpath(path)
    except (OSError, ValueError):  # a NUL in a name
        return None
    return real if real == root or real.startswith(root + os.sep) else None


def page_link(path: Path, page_dir: Path) -> str:
    """`path` relative to a page in `page_dir`, percent-encoded bytes: any file name (UTF-8
    or not) resolves to its file."""
    return quote(os.fsencode(Path(os.path.relpath(path.resolve(), page_dir.resolve())).as_posix()))


def _original(rec: dict[str, Any], page_dir: Path) -> str | None:
    """A link to the input image when it is a file on this machine (not inside a shard)."""
    path = Path(str(rec.get("input", "")))
    return page_link(path, page_dir) if path.is_file() else None


def embed_json(payload: Any) -> str:
    """`payload` as JSON to put inside a page's `<script>` element: `<`, `>` and `&` are
    written as `\\u003c`, `\\u003e`, `\\u0026`, so no text in it (`</script>`, `<!--`) can
    end the element or change how the HTML parser reads it; JSON.parse reads them back."""
    text = json.dumps(payload, ensure_ascii=False)
    for char, escape in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026")):
        text = text.replace(char, escape)
    return text


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
