"""The bookkeeping of a run folder: one run at a time, a manifest that survives kills and full
disks, what an earlier run finished, and files a killed run left half-written (`prepare_run`
puts them together)."""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any

from ..errors import ClipvizError
from ..files import append_jsonl, provenance, read_jsonl

MANIFEST = "manifest.jsonl"
LOCK = ".clipviz.lock"
DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})


def check_out(out: Path) -> None:
    """A run folder must be a folder (or not exist yet)."""
    if out.exists() and not out.is_dir():
        raise ClipvizError(f"`out` {out} is a file; pass a folder (it is created if missing)")


def not_writable(out: Path, error: OSError, option: str = "out") -> ClipvizError:
    """The one line for an `out` (or another `option`'s path) this process cannot write into
    (a full disk has its own)."""
    if error.errno in DISK_FULL:
        return disk_full(error, out)
    return ClipvizError(
        f"`{option}` {out} is not writable ({error.strerror or error}); choose a place you "
        "can write to"
    )


@contextlib.contextmanager
def run_lock(out: Path) -> Iterator[None]:
    """Hold `OUT/.clipviz.lock` for a run: a second run into the same folder is refused at
    once rather than doing images twice. The operating system releases the lock when the
    process ends, however it ends."""
    from filelock import FileLock, Timeout

    check_out(out)
    lock = FileLock(str(out / LOCK), timeout=0)
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock.acquire()
    except Timeout:
        raise ClipvizError(
            f"another clipviz run is writing into {out}; wait for it to finish or choose "
            "another `out`"
        ) from None
    except OSError as e:
        raise not_writable(out, e) from None
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
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return 0
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return 0
        f.seek(0)
        keep = f.read().rfind(b"\n") + 1  # torn, which is rare: read it once
        f.truncate(keep)
        return size - keep


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


def proxy_weights(options: dict[str, Any]) -> list[dict[str, int] | None]:
    """Size and time of each local file a method's `proxy` option reads, so that weights
    replaced at the same path do not pass for the old ones; empty for a model hub name."""
    from ..segment.proxy import proxy_files

    spec = options.get("proxy")
    return [source_stamp(p) for p in proxy_files(spec)] if isinstance(spec, str) else []


def methods_proxy_weights(options: dict[str, Any]) -> dict[str, list[dict[str, int] | None]]:
    """`proxy_weights` of each method's options (`{method: {option: value}}`), for the
    methods whose proxy is a local file."""
    return {
        m: stamps
        for m, o in options.items()
        if isinstance(o, dict) and (stamps := proxy_weights(o))
    }


def part_path(path: Path, rank: int) -> Path:
    """The part of the JSON-lines file `path` that rank `rank` of a job appends to."""
    return path.with_name(f"{path.stem}.rank{rank}{path.suffix}")


def parts_of(path: Path) -> list[Path]:
    """The rank parts of `path` that exist, in rank order."""
    found = []
    for p in path.parent.glob(f"{path.stem}.rank*{path.suffix}"):
        rank = p.name[len(path.stem) + len(".rank") : len(p.name) - len(path.suffix)]
        if rank.isdigit():
            found.append((int(rank), p))
    return [p for _, p in sorted(found)]


def manifest_path(out: Path, rank: int, world: int) -> Path:
    """Where this process appends its records: the manifest, or its rank's part in a job."""
    return out / MANIFEST if world == 1 else part_path(out / MANIFEST, rank)


def remove_records(path: Path) -> None:
    """Delete a JSON-lines file and its rank parts (to start afresh)."""
    for p in (path, *parts_of(path)):
        p.unlink(missing_ok=True)


def merge_parts(path: Path) -> int:
    """Append every rank's part of `path` to it, in rank order, and remove the parts (also
    those a killed job left); returns the records moved. Only rank 0 calls this, while the
    other ranks wait or are done."""
    moved = 0
    for part in parts_of(path):
        repair_manifest(part)
        lines = part.read_bytes()
        if lines:
            with disk_full_stops(path), open(path, "ab") as f:
                f.write(lines)
                f.flush()
                os.fsync(f.fileno())
            moved += lines.count(b"\n")
        part.unlink()
    return moved


def latest_records(out: Path) -> dict[str, dict[str, Any]]:
    """The last manifest record of every input, by input path (parts of a job included)."""
    latest: dict[str, dict[str, Any]] = {}
    # the parts first: a merge running meanwhile moves them into the manifest, read after
    parts = parts_of(out / MANIFEST)
    for path in (*parts, out / MANIFEST):
        for rec in read_jsonl(path):
            if "input" in rec:
                latest[rec["input"]] = rec
    return latest


def finished(out: Path, key: str, inputs: Collection[str]) -> dict[str, dict[str, Any]]:
    """Of `inputs` (keys), those whose latest record is complete for this request, whose files
    exist and whose file has not changed since."""
    return {
        inp: rec
        for inp, rec in latest_records(out).items()
        if inp in inputs
        and rec.get("status") in ("ok", "skipped")
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


@contextlib.contextmanager
def disk_full_stops(where: Path) -> Iterator[None]:
    """A full disk inside the block becomes the one-line `disk_full` error; other errors pass."""
    try:
        yield
    except OSError as e:
        if e.errno in DISK_FULL:
            raise disk_full(e, where) from None
        raise


def append_record(path: Path, rec: dict[str, Any]) -> dict[str, Any]:
    """Append one record, with the versions that wrote it, to a manifest (a full disk stops
    the run in one line, what is finished kept)."""
    rec.update(provenance())
    with disk_full_stops(path):
        append_jsonl(path, rec)
    return rec
