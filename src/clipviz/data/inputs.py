"""The inputs of a run: files, folders, quoted globs and list files, each with the folder
(relative to the output root) its outputs go to."""

from __future__ import annotations

import functools
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
    """One input file and the folder (relative to the output root) its outputs go to; `error`
    says why it cannot be read when that is known before decoding (a dangling link, an
    unreadable folder), so the run records it as failed."""

    path: Path
    rel: Path
    error: str | None = None

    @functools.cached_property
    def key(self) -> str:
        """The input's real path (links followed; a looping link stays as it is): how runs
        record it and tell two inputs apart. Resolved once."""
        return os.path.realpath(self.path)


def _is_image_name(p: Path) -> bool:
    return p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")


def _absolute(path: Path) -> Path:
    """The absolute path, symbolic links kept (the output mirrors the path as given)."""
    return Path(os.path.abspath(path))


def _rel_dir(path: Path, base: Path) -> Path:
    """The output folder of `path`: its path below `base`, file name included (so
    `a/cat.jpg` and `a/cat.png` never collide)."""
    try:
        return _absolute(path).relative_to(_absolute(base))
    except ValueError:
        return Path(*[p for p in _absolute(path).parts if p not in ("/", "\\")][-2:])


def read_list_file(path: str, what: str) -> list[str]:
    """Non-empty, non-comment lines of a file (`-` = stdin); bytes that are not UTF-8 are
    kept as the file-system encoding keeps them, so any file name can be listed."""
    try:
        data = sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()
    except OSError as e:
        raise ClipvizError(f"cannot read {what} {path}: {e.strerror or e}") from e
    text = data.decode("utf-8", errors="surrogateescape")
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]


def link_problem(path: Path) -> str | None:
    """Why a path that is a symbolic link cannot be read (dangling, or a loop), else None."""
    if not path.is_symlink():
        return None
    try:
        path.stat()
    except FileNotFoundError:
        return f"dangling symbolic link (its target {os.readlink(path)} does not exist)"
    except OSError as e:
        return f"unusable symbolic link ({e.strerror or e})"
    return None


def _inside(path: Path, folders: list[Path]) -> bool:
    real = Path(os.path.realpath(path))
    return any(real == f or f in real.parents for f in folders)


def _walk(root: Path, recursive: bool, exclude: list[Path]) -> tuple[list[InputItem], int]:
    """Image files under `root` (hidden files and folders skipped), each folder once even
    through looping links; unreadable folders and broken links become failed items."""
    items: list[InputItem] = []
    ignored = 0
    seen: set[tuple[int, int]] = set()

    def unreadable(error: OSError) -> None:
        folder = Path(error.filename or root)
        items.append(
            InputItem(
                folder, _rel_dir(folder, root), f"cannot read folder: {error.strerror or error}"
            )
        )

    for folder, dirs, files in os.walk(root, onerror=unreadable, followlinks=True):
        here = Path(folder)
        try:
            st = here.stat()
        except OSError:
            continue
        if (st.st_dev, st.st_ino) in seen or _inside(here, exclude):
            dirs[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")) if recursive else []
        for name in sorted(files):
            f = here / name
            if name.startswith("."):
                continue
            if (problem := link_problem(f)) is not None:
                if _is_image_name(f):
                    items.append(InputItem(f, _rel_dir(f, root), problem))
                else:
                    ignored += 1
                continue
            if _is_image_name(f):
                items.append(InputItem(f, _rel_dir(f, root)))
            else:
                ignored += 1
    return items, ignored


def collect_inputs(
    inputs: Iterable[str],
    recursive: bool = False,
    inputs_file: str | None = None,
    exclude: Iterable[str | os.PathLike[str]] = (),
) -> tuple[list[InputItem], int]:
    """Expand files, folders and globs into input items; returns (items, ignored files).

    Files named explicitly (or listed in `inputs_file`) are always attempted, so a bad one
    is reported; in folders only files with image extensions are taken. Nothing inside an
    `exclude` folder (the run's own output folder) is ever an input.
    """
    skip = [Path(os.path.realpath(e)) for e in exclude]
    items: list[InputItem] = []
    ignored = 0
    explicit: list[Path] = []
    for raw in inputs:
        p = Path(raw).expanduser()
        if p.is_dir():
            found, n = _walk(p, recursive, skip)
            items += found
            ignored += n
        elif p.is_file() or p.is_symlink():
            explicit.append(p)
        elif glob.has_magic(raw):
            matches = sorted(Path(m) for m in glob.glob(os.path.expanduser(raw), recursive=True))
            base = Path(raw.split("*")[0].split("?")[0].split("[")[0] or ".")
            base = base if base.is_dir() else base.parent
            files = [m for m in matches if m.is_file() and not _inside(m, skip)]
            if not files:
                raise ClipvizError(f"no files match {raw!r}; check the pattern (quote it)")
            items.extend(InputItem(m, _rel_dir(m, base)) for m in files if _is_image_name(m))
            ignored += sum(1 for m in files if not _is_image_name(m))
        else:
            raise ClipvizError(f"input {raw} does not exist; pass an image, a folder or a glob")
    if inputs_file is not None:
        explicit.extend(Path(line).expanduser() for line in read_list_file(inputs_file, "list"))
    explicit = [p for p in explicit if not _inside(p, skip)]
    if explicit:
        parents = [str(_absolute(p).parent) for p in explicit]
        base = Path(os.path.commonpath(parents))
        items.extend(InputItem(p, _rel_dir(p, base), link_problem(p)) for p in explicit)
    seen: set[str] = set()
    unique = []
    for it in items:
        if it.key not in seen:
            seen.add(it.key)
            unique.append(it)
    return unique, ignored
