"""WebDataset tar shards as img2dataset writes them (`00000042.jpg`, `.txt`, `.json`): brace
patterns, streaming reads that survive damaged shards, atomic shard and parquet writes."""

from __future__ import annotations

import contextlib
import glob
import io
import itertools
import json
import os
import posixpath
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

from ..errors import ClipvizError
from ..files import atomic_path
from .images import IMAGE_EXTENSIONS

SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
# A typo such as {0..99999999} should fail at once, not fill the memory with names.
MAX_EXPANSION = 1_000_000

_GROUP = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"(\d+)\.\.(\d+)")
_GLOB_CHARS = re.compile(r"[*?[]")
_IMAGE_EXTS = frozenset(ext.lstrip(".") for ext in IMAGE_EXTENSIONS)
# What a damaged or unreadable stream raises; tarfile turns decompression errors into its own.
_STREAM_ERRORS = (OSError, EOFError, tarfile.TarError)
_HEADER_ENDS = {"EmptyHeaderError": "the file ends without the tar end-of-archive marker"}


def expand_braces(pattern: str) -> list[str]:
    """Expand `{00000..00099}` ranges (zero padding kept) and `{a,b,c}` lists like bash and
    WebDataset do; several groups give their product, leftmost slowest."""
    pieces = _GROUP.split(pattern)  # literal, group, literal, group, ..., literal
    choices = [[p] if i % 2 == 0 else _expand_group(p, pattern) for i, p in enumerate(pieces)]
    return ["".join(parts) for parts in itertools.product(*choices)]


def _expand_group(body: str, pattern: str) -> list[str]:
    if ".." not in body:
        return body.split(",") if "," in body else ["{" + body + "}"]
    match = _RANGE.fullmatch(body)
    if match is None:
        raise ClipvizError(f"brace range {{{body}}} in {pattern!r} must be like {{000..099}}")
    first, last = match.groups()
    padded = (len(first) > 1 and first.startswith("0")) or len(first) == len(last)
    lo, hi = int(first), int(last)
    if abs(hi - lo) >= MAX_EXPANSION:
        raise ClipvizError(f"brace range {{{body}}} has over {MAX_EXPANSION} values; fix it")
    step = 1 if hi >= lo else -1
    return [str(n).zfill(len(first) if padded else 0) for n in range(lo, hi + step, step)]


def is_shard_spec(text: str) -> bool:
    """True when `text` names tar shards: a path, brace pattern or glob ending in `.tar`."""
    try:
        names = expand_braces(text)
    except ClipvizError:
        names = [text]  # still meant as shards; `shard_paths` will say what is wrong
    return bool(text) and all(name.lower().endswith(SHARD_SUFFIXES) for name in names)


def shard_paths(spec: str) -> list[Path]:
    """The shard files `spec` names: braces expanded, then globs matched, in that order,
    each file once. Raises `ClipvizError` when a named shard is missing or none matches."""
    names = expand_braces(spec)
    found: list[str] = []
    missing: list[str] = []
    for name in names:
        if _GLOB_CHARS.search(name):
            found += [p for p in sorted(glob.glob(name)) if os.path.isfile(p)]
        else:
            (found if os.path.isfile(name) else missing).append(name)
    if missing:
        count = f"{len(missing)} of {len(names)}"
        raise ClipvizError(f"{count} shards do not exist, first: {missing[0]}; check the pattern")
    if not found:
        raise ClipvizError(f"no shard files match {spec!r}; check the pattern")
    return [Path(p) for p in dict.fromkeys(found)]


@dataclass
class ShardSample:
    """The members of a shard sharing `key` (the name up to the first dot of its file name,
    folders kept); `ext` is the image's, in lower case; `error` says why it is unusable."""

    key: str
    image: bytes | None = None
    ext: str | None = None
    caption: str | None = None
    meta: dict[str, Any] | None = None
    error: str | None = None


class _WatchedTar(tarfile.TarFile):
    unclean_end: str | None = None
    members: list[tarfile.TarInfo]  # set by TarFile; typeshed leaves it out


class _WatchedInfo(tarfile.TarInfo):
    @classmethod
    def fromtarfile(cls, archive: tarfile.TarFile) -> Self:
        # TarFile.next stops on a cut or garbled header as quietly as at a clean end; this
        # error is the only trace of the difference (its classes are private: matched by name)
        try:
            return super().fromtarfile(archive)
        except tarfile.HeaderError as e:
            kind = type(e).__name__
            if isinstance(archive, _WatchedTar) and kind != "EOFHeaderError":
                archive.unclean_end = _HEADER_ENDS.get(kind, f"bad member header ({e})")
            raise


def _reason(e: BaseException) -> str:
    text = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
    return " ".join(text.split()) or type(e).__name__


def read_shard(path: Path) -> Iterator[ShardSample]:
    """Stream the samples of one tar shard in tar order, never seeking nor extracting.

    A damaged shard yields the samples completed before the damage (not the one being read:
    it may lack members), then one `<name>#damaged` sample whose `error` says why; a shard
    that cannot be opened yields one `<name>#unreadable` sample."""
    path = Path(path)
    try:
        tar = _WatchedTar.open(path, "r|*", tarinfo=_WatchedInfo)
    except _STREAM_ERRORS as e:
        yield ShardSample(f"{path.name}#unreadable", error=f"shard cannot be read: {_reason(e)}")
        return
    done, key, damage = 0, "", None
    parts: list[tuple[str, bytes]] = []  # (extension, bytes) of the sample being read
    with tar:
        try:
            while (info := tar.next()) is not None:
                tar.members.clear()  # stream mode would keep every header of the shard
                name = info.name.removeprefix("./")
                base = posixpath.basename(name)
                if not info.isreg() or base.startswith((".", "__")):
                    continue
                stem, _, ext = base.partition(".")
                member_key = posixpath.join(posixpath.dirname(name), stem)
                if parts and member_key != key:
                    yield _assemble(key, parts)
                    done, parts = done + 1, []
                key = member_key
                member = tar.extractfile(info)
                parts.append((ext.lower(), member.read() if member else b""))
        except _STREAM_ERRORS as e:
            damage = _reason(e)
    damage = damage or tar.unclean_end
    if damage is not None:
        why = f"shard is truncated or corrupt after {done} samples: {damage}"
        yield ShardSample(f"{path.name}#damaged", error=why)
    elif parts:
        yield _assemble(key, parts)


def _assemble(key: str, parts: list[tuple[str, bytes]]) -> ShardSample:
    """One sample from its members' (extension, bytes): the image, caption and metadata."""
    sample = ShardSample(key)
    images = [(ext, data) for ext, data in parts if ext in _IMAGE_EXTS]
    first = dict(reversed(parts))  # extension -> bytes of its first member
    problems: list[str] = []
    if len(images) == 1:
        sample.ext, sample.image = images[0]
    elif not images:
        members = ", ".join(ext or "(no extension)" for ext, _ in parts)
        problems.append(f"no image in this sample (members: {members})")
    else:
        count = "two" if len(images) == 2 else str(len(images))
        problems.append(f"{count} images in one sample: {', '.join(e for e, _ in images)}")
    if "txt" in first:
        sample.caption = first["txt"].decode("utf-8", errors="replace").strip()
    if "json" in first:
        try:
            meta, why = json.loads(first["json"]), "its json is not a JSON object"
        except (ValueError, RecursionError) as e:
            meta, why = None, f"its json is not valid JSON ({_reason(e)})"
        if isinstance(meta, dict):
            sample.meta = meta
        elif not images:
            problems.append(why)
    sample.error = "; ".join(problems) or None
    return sample


class ShardWriter:
    """`with ShardWriter(path) as w: w.add(name, data)` writes a tar that appears at `path` only
    if the block succeeds; no owner and no time, so equal adds give byte-identical shards."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._stack = contextlib.ExitStack()
        self._tar: tarfile.TarFile | None = None

    def __enter__(self) -> ShardWriter:
        with self._stack as stack:  # undoes the temporary file if the tar cannot start
            tmp = stack.enter_context(atomic_path(self.path))
            self._tar = stack.enter_context(tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT))
            self._stack = stack.pop_all()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._tar = None
        self._stack.__exit__(*exc_info)  # closes the tar, then renames or removes it

    def add(self, name: str, data: bytes) -> None:
        """Add one regular file `name` (a relative path inside the shard) holding `data`."""
        if self._tar is None:
            raise ClipvizError("ShardWriter.add needs an open writer; use `with ShardWriter(p)`")
        if not name or name.startswith("/") or ".." in name.split("/") or "\x00" in name:
            raise ClipvizError(f"shard member {name!r} must be a relative path without '..'")
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime, info.uid, info.gid = len(data), 0o644, 0, 0, 0
        info.uname = info.gname = ""
        self._tar.addfile(info, io.BytesIO(data))


def write_parquet_atomic(
    path: Path, columns: dict[str, list[Any]], metadata: dict[str, str] | None = None
) -> None:
    """Write `columns`, with `metadata` in the schema, as zstd parquet that appears whole."""
    import pyarrow as pa  # heavy to import: only parquet outputs pay for it
    import pyarrow.parquet as pq

    encoded = {k.encode("utf-8"): v.encode("utf-8") for k, v in (metadata or {}).items()}
    table = pa.table(columns).replace_schema_metadata(encoded or None)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")


def read_parquet_metadata(path: Path) -> dict[str, str] | None:
    """A parquet file's schema metadata, read from its footer; None if missing or not parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except (OSError, pa.ArrowException):
        return None
    pairs = (schema.metadata or {}).items()
    return {k.decode(errors="replace"): v.decode(errors="replace") for k, v in pairs}
