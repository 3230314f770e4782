"""The bookkeeping of a run folder: one run at a time, a manifest that survives kills and full
disks, what an earlier run finished, and files a killed run left half-written."""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import ClipvizError
from ..files import read_jsonl

MANIFEST = "manifest.jsonl"
LOCK = ".clipviz.lock"
DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})


@contextlib.contextmanager
def run_lock(out: Path) -> Iterator[None]:
    """Hold `OUT/.clipviz.lock` for a run: a second run into the same folder is refused at
    once rather than doing images twice. The operating system releases the lock when the
    process ends, however it ends."""
    from filelock import FileLock, Timeout

    if out.exists() and not out.is_dir():
        raise ClipvizError(f"`out` {out} is a file; pass a folder (it is created if missing)")
    out.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(out / LOCK), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise ClipvizError(
            f"another clipviz run is writing into {out}; wait for it to finish or choose "
            "another `out`"
        ) from None
    try:
        yield
    finally:
        lock.release()


def repair_manifest(path: Path) -> int:
    """Cut a torn last line (a run killed, or the disk full, while appending); returns the
    bytes dropped. Complete lines are never touched."""
    if not path.is_file():
        return 0
    with open(path, "rb+") as f:
        data = f.read()
        if not data or data.endswith(b"\n"):
            return 0
        keep = data.rfind(b"\n") + 1
        f.truncate(keep)
        return len(data) - keep


def remove_stale_temporaries(out: Path) -> int:
    """Delete the temporary files (`.<name>.<random>.tmp<suffix>`) that atomic writes of a
    killed run left behind; only called while holding the run lock."""
    removed = 0
    for folder, _, files in os.walk(out):
        for name in files:
            if name.startswith(".") and ".tmp" in name and name != LOCK:
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(folder, name))
                    removed += 1
    return removed


def source_stamp(path: Path) -> dict[str, int] | None:
    """Size and modification time of an input, so a replaced file is not skipped."""
    try:
        st = path.stat()
    except OSError:
        return None
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def latest_records(out: Path) -> dict[str, dict[str, Any]]:
    """The last manifest record of every input, by input path."""
    latest: dict[str, dict[str, Any]] = {}
    for rec in read_jsonl(out / MANIFEST):
        if "input" in rec:
            latest[rec["input"]] = rec
    return latest


def finished(out: Path, key: str) -> dict[str, dict[str, Any]]:
    """Inputs whose latest record is complete for this request, whose files exist and whose
    file has not changed since."""
    return {
        inp: rec
        for inp, rec in latest_records(out).items()
        if rec.get("status") in ("ok", "skipped")
        and rec.get("key") == key
        and (out / rec.get("output", "") / "maps.npz").is_file()
        and rec.get("source") is not None
        and rec.get("source") == source_stamp(Path(inp))
    }


def disk_full(error: OSError, where: Path) -> ClipvizError:
    """The one line for a full disk: the run stops, what is finished stays."""
    return ClipvizError(
        f"disk full writing {getattr(error, 'filename', None) or where}; finished results "
        "kept — free some space and run the same command again to resume",
        exit_code=1,
    )
