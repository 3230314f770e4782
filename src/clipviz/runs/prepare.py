"""What every run does before its first output and after its last: the `out` folder checked
(a folder, writable, a clipviz run of the same kind or empty), held, tidied, its run.json
written; in a torchrun job, the ranks started and ended together."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..distributed import Dist, together
from ..errors import ClipvizError
from .manifest import (
    LOCK,
    MANIFEST,
    check_out,
    manifest_path,
    merge_parts,
    not_writable,
    remove_stale_temporaries,
    repair_manifest,
    run_lock,
)
from .run_json import KINDS, RUN_JSON, read_run_json, write_run_json


def _is_leftover(name: str) -> bool:
    """A file a run leaves in a folder before its run.json: the lock, a killed write's
    temporary."""
    return name == LOCK or (name.startswith(".") and ".tmp" in name)


def check_out_folder(
    out: Path, kind: str, overwrite: bool = False, can_overwrite: bool = True
) -> None:
    """Refuse, before any work, an `out` that a run of `kind` must not write into: a file, a
    folder this process cannot write, a folder holding files but no clipviz run (the user's
    files would be replaced), or a clipviz run of another kind. `overwrite` (offered to the
    user when `can_overwrite`) writes into the last two anyway."""
    check_out(out)
    _check_can_create(out, "out")
    if not out.is_dir() or overwrite:
        return
    anyway = ", or pass `overwrite` to write into it anyway" if can_overwrite else ""
    run = read_run_json(out)
    if run is None:
        others = sorted(name for name in os.listdir(out) if not _is_leftover(name))
        if others:
            shown = ", ".join(others[:3]) + (", …" if len(others) > 3 else "")
            raise ClipvizError(
                f"`out` {out} is not a clipviz run (no {RUN_JSON}) and holds other files "
                f"({shown}); choose a new or empty folder{anyway}"
            )
    elif run["kind"] != kind:
        raise ClipvizError(
            f"`out` {out} holds a clipviz {KINDS[run['kind']]}; choose another folder{anyway}"
        )


def _check_can_create(path: Path, option: str) -> None:
    """Refuse a `path` that this process could not create or write (judged by its nearest
    existing folder, so that nothing is created yet)."""
    existing = path
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if existing != path and not existing.is_dir():
        raise not_writable(path, NotADirectoryError(errno.ENOTDIR, f"{existing} is a file"), option)
    if not os.access(existing, os.W_OK | os.X_OK if existing.is_dir() else os.W_OK):
        raise not_writable(path, PermissionError(errno.EACCES, "permission denied"), option)


def check_results_file(path: Path) -> None:
    """Refuse, before any work, a results JSON (`json`) that clipviz must not write: in a
    folder this process cannot write, or a file that clipviz did not write."""
    _check_can_create(path, "json")
    if not path.exists():
        return
    try:
        ours = "schema_version" in json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError):
        ours = False
    if not ours:
        raise ClipvizError(
            f"`json` {path} exists and is not clipviz results; choose another path or move "
            "that file away"
        )


def check_writable(out: Path) -> None:
    """Prove that this process can create files in `out` (creating the folder if missing)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".clipviz-probe.", suffix=".tmp", dir=out)
        os.close(fd)
        with contextlib.suppress(FileNotFoundError):  # rank 0 may tidy it away first
            os.unlink(probe)
    except OSError as e:
        raise not_writable(out, e) from None


@contextlib.contextmanager
def prepare_run(
    out: Path,
    kind: str,
    fields: dict[str, Any],
    *,
    overwrite: bool = False,
    can_overwrite: bool = True,
    dist: Dist = Dist(),
    end_together: bool = True,
) -> Iterator[Path]:
    """Hold `out` for a run of `kind` and yield the manifest this process appends to.

    Rank 0 checks the folder (`check_out_folder`), holds its lock until the end, tidies it (a
    torn manifest line cut, parts of a killed job merged, half-written temporaries removed)
    and writes run.json (`fields`, with `kind` and the versions); then the other ranks check
    that they can write there too. An error on any rank there stops every rank alike. With
    `end_together`, an error that ends any rank's share of the work is raised on every rank
    too, once all are done, after rank 0 has merged every rank's part into the manifest (what
    the ranks finished is kept). Without a job, errors pass unchanged.
    """
    with contextlib.ExitStack() as held:
        with together(dist):
            if dist.main:
                check_out_folder(out, kind, overwrite, can_overwrite)
                held.enter_context(run_lock(out))
                repair_manifest(out / MANIFEST)
                merge_parts(out / MANIFEST)
                remove_stale_temporaries(out)
                write_run_json(out, kind, fields)
        with together(dist):
            if not dist.main:
                check_writable(out)
        manifest = manifest_path(out, dist.rank, dist.world)
        if not end_together:
            yield manifest
            return
        try:
            with together(dist):
                yield manifest
        except ClipvizError:
            if dist.main and dist.world > 1:  # every rank has stopped: keep what they did
                merge_parts(out / MANIFEST)
            raise
        if dist.main:
            merge_parts(out / MANIFEST)
