"""The cache root, atomic file writes (a killed run never leaves a half-written file), content
hashes of large files, and the provenance every output carries."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

# Version of the layout of run.json, manifest records, eval JSON and checkpoints.
SCHEMA_VERSION = 1


def cache_root() -> Path:
    """`$CLIPVIZ_CACHE`, else `$XDG_CACHE_HOME/clipviz`, else `~/.cache/clipviz`."""
    if env := os.environ.get("CLIPVIZ_CACHE"):
        return Path(env).expanduser()
    if xdg := os.environ.get("XDG_CACHE_HOME"):
        return Path(xdg).expanduser() / "clipviz"
    return Path.home() / ".cache" / "clipviz"


@functools.cache
def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@functools.cache
def package_version(name: str) -> str | None:
    """An installed distribution's version, read from its metadata once (nothing is
    imported)."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def provenance() -> dict[str, Any]:
    """`schema_version` and the versions of clipviz, open_clip, torch, timm and transformers
    (None: not installed), for every output."""
    return {
        "schema_version": SCHEMA_VERSION,
        "versions": {
            "clipviz": package_version("clipviz"),
            "open_clip": package_version("open_clip_torch"),
            "torch": package_version("torch"),
            "timm": package_version("timm"),
            "transformers": package_version("transformers"),
        },
    }


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent
    )
    os.close(fd)
    try:
        yield Path(tmp)
        # mkstemp makes 0600, and so do writers that write a file of their own and rename
        # it over ours (safetensors): the finished file follows the umask like any output
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8", errors="backslashreplace")


def write_json_atomic(path: str | os.PathLike[str], data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def append_jsonl(path: str | os.PathLike[str], record: dict[str, Any]) -> None:
    """Append one JSON line with a single write, so a crash loses at most that line."""
    # ASCII escapes keep file names that are not UTF-8 (surrogates) readable and exact
    line = json.dumps(record, ensure_ascii=True) + "\n"
    with open(path, "a", encoding="utf-8") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read a JSON-lines file, skipping a torn last line left by a killed run."""
    records: list[dict[str, Any]] = []
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:  # not written yet, or a part merged away meanwhile
        return records
    for line in text.splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            records.append(rec)
    return records


def content_digest(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a file's bytes, remembered per (path, size, mtime) under the cache root so
    that gigabytes of weights are read once, not on every run."""
    p = Path(path).resolve()
    st = p.stat()
    stamp = f"{p}:{st.st_size}:{st.st_mtime_ns}"
    store = cache_root() / "digests.json"
    known: dict[str, str] = {}
    with contextlib.suppress(OSError, ValueError):
        known = json.loads(store.read_text(encoding="utf-8"))
    if isinstance(known, dict) and isinstance(known.get(stamp), str):
        return known[stamp]
    digest = hashlib.sha256()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    value = digest.hexdigest()
    known = {k: v for k, v in (known if isinstance(known, dict) else {}).items()
             if not k.startswith(f"{p}:")}  # fmt: skip
    known[stamp] = value
    with contextlib.suppress(OSError):
        write_text_atomic(store, json.dumps(known, indent=0, sort_keys=True))
    return value
