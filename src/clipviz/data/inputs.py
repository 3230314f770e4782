"""The inputs of a run: files, folders, quoted globs and list files, each with the folder
(relative to the output root) its outputs go to."""

from __future__ import annotations

import glob
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ..errors import ClipvizError
from .images import IMAGE_EXTENSIONS


@dataclass(frozen=True)
class InputItem:
    """One input file and the folder (relative to the output root) its outputs go to."""

    path: Path
    rel: Path


def _has_magic(s: str) -> bool:
    return glob.has_magic(s)


def _is_image_name(p: Path) -> bool:
    return p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")


def _rel_dir(path: Path, base: Path) -> Path:
    """The output folder of `path`: its path below `base`, file name included (so
    `a/cat.jpg` and `a/cat.png` never collide)."""
    try:
        return path.resolve().relative_to(base.resolve())
    except ValueError:
        return Path(*[p for p in path.resolve().parts if p not in ("/", "\\")][-2:])


def read_list_file(path: str, what: str) -> list[str]:
    """Non-empty, non-comment lines of a file (`-` = stdin)."""
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ClipvizError(f"cannot read {what} {path}: {e.strerror or e}") from e
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]


def collect_inputs(
    inputs: Iterable[str], recursive: bool = False, inputs_file: str | None = None
) -> tuple[list[InputItem], int]:
    """Expand files, folders and globs into input items; returns (items, ignored files).

    Files named explicitly (or listed in `inputs_file`) are always attempted, so a bad one
    is reported; in folders only files with image extensions are taken.
    """
    items: list[InputItem] = []
    ignored = 0
    explicit: list[Path] = []
    for raw in inputs:
        p = Path(raw).expanduser()
        if p.is_dir():
            pattern = "**/*" if recursive else "*"
            for f in sorted(p.glob(pattern)):
                if not f.is_file() or any(part.startswith(".") for part in f.relative_to(p).parts):
                    continue
                if _is_image_name(f):
                    items.append(InputItem(f, _rel_dir(f, p)))
                else:
                    ignored += 1
        elif p.is_file():
            explicit.append(p)
        elif _has_magic(raw):
            matches = sorted(Path(m) for m in glob.glob(os.path.expanduser(raw), recursive=True))
            base = Path(raw.split("*")[0].split("?")[0].split("[")[0] or ".")
            base = base if base.is_dir() else base.parent
            files = [m for m in matches if m.is_file()]
            if not files:
                raise ClipvizError(f"no files match {raw!r}; check the pattern (quote it)")
            items.extend(InputItem(m, _rel_dir(m, base)) for m in files if _is_image_name(m))
            ignored += sum(1 for m in files if not _is_image_name(m))
        else:
            raise ClipvizError(f"input {raw} does not exist; pass an image, a folder or a glob")
    if inputs_file is not None:
        explicit.extend(Path(line).expanduser() for line in read_list_file(inputs_file, "list"))
    if explicit:
        parents = [str(p.resolve().parent) for p in explicit]
        base = Path(os.path.commonpath(parents))
        items.extend(InputItem(p, _rel_dir(p, base)) for p in explicit)
    seen: set[Path] = set()
    unique = []
    for it in items:
        key = it.path.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(it)
    return unique, ignored
