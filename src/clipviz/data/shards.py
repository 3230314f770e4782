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
from .images import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS

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
# A member a sample uses is read whole: a caption or metadata file up to this size, an image up
# to what `max_pixels` lets it be (`image_byte_limit`). Larger ones fail their sample unread.
SIDECAR_MAX_BYTES = 4_000_000
_SIDECARS = frozenset({"txt", "json"})
# an encoded image's bytes per pixel at most (16-bit RGBA or CMYK, stored), plus its metadata
_IMAGE_BYTES_PER_PIXEL = 8
_IMAGE_HEADROOM = 1 << 20
# the caption column holds this many characters at most (CLIP reads 77 tokens of it)
CAPTION_MAX_CHARS = 2000
_TWICE = "key appears twice in the shard; only its first sample is explained"


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


def escape_name(text: str) -> str:
    """A member name (undecodable bytes as surrogates, as tarfile reads them) as UTF-8 text,
    reversibly: `%` becomes `%25` and each byte that is not UTF-8 `%XX`, so that
    `urllib.parse.unquote_to_bytes` gives back the name's bytes."""
    if "%" not in text and text.isascii():
        return text
    return "".join(_escape_char(c) for c in text)


def _escape_char(c: str) -> str:
    if c == "%":
        return "%25"
    if "\udc80" <= c <= "\udcff":  # the byte tarfile could not decode (surrogateescape)
        return f"%{ord(c) - 0xDC00:02X}"
    return c


def _leaves_shard(name: str) -> bool:
    """Whether member `name`, extracted, would land outside the folder it is extracted in."""
    return name.startswith("/") or ".." in name.split("/")


def image_byte_limit(max_pixels: int) -> int:
    """The most bytes an encoded image of at most `max_pixels` pixels is read with."""
    return _IMAGE_BYTES_PER_PIXEL * max_pixels + _IMAGE_HEADROOM


@dataclass
class ShardSample:
    """The members of a shard sharing `key` (the name up to the first dot of its file name,
    folders kept, escaped by `escape_name`); `ext` is the image's, in lower case; `error`
    says why it is unusable."""

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


@dataclass
class _Member:
    """A member of the sample being read: `data` only if the sample uses it and it could be
    read, `problem` if the member fails its sample."""

    ext: str  # lower case, escaped
    data: bytes | None = None
    problem: str | None = None


def read_shard(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> Iterator[ShardSample]:
    """Stream the samples of one tar shard in tar order, never seeking nor extracting.

    Only the members a sample uses are read (its image, first `.txt` and first `.json`), each
    up to its size limit; a larger one, a link, a device, a name that would land outside the
    shard's folder, or a key met again after other samples makes a sample with an `error`.
    A damaged shard yields the samples completed before the damage (not the one being read:
    it may lack members), then one `<name>#damaged` sample whose `error` says why; a shard
    that cannot be opened yields one `<name>#unreadable` sample."""
    path = Path(path)
    shard = escape_name(path.name)
    try:
        tar = _WatchedTar.open(path, "r|*", tarinfo=_WatchedInfo)
    except _STREAM_ERRORS as e:
        yield ShardSample(f"{shard}#unreadable", error=f"shard cannot be read: {_reason(e)}")
        return
    done, key, damage = 0, "", None
    parts: list[_Member] = []  # the members of the sample being read
    taken: set[str] = set()  # what of it is read: "image", "txt", "json"
    seen: set[str] = set()  # the keys of the samples before it
    with tar:
        try:
            while (info := tar.next()) is not None:
                tar.members.clear()  # stream mode would keep every header of the shard
                name = info.name.removeprefix("./")
                base = posixpath.basename(name)
                if info.isdir() or base.startswith((".", "__")):
                    continue
                stem, _, ext = base.partition(".")
                member_key = escape_name(posixpath.join(posixpath.dirname(name), stem))
                if parts and member_key != key:
                    yield _assemble(key, parts, seen)
                    done, parts, taken = done + 1, [], set()
                key = member_key
                parts.append(_take(tar, info, name, ext.lower(), taken, max_pixels))
        except _STREAM_ERRORS as e:
            damage = _reason(e)
    damage = damage or tar.unclean_end
    if damage is not None:
        why = f"shard is truncated or corrupt after {done} samples: {escape_name(damage)}"
        yield ShardSample(f"{shard}#damaged", error=why)
    elif parts:
        yield _assemble(key, parts, seen)


def _take(
    tar: tarfile.TarFile,
    info: tarfile.TarInfo,
    name: str,
    ext: str,
    taken: set[str],
    max_pixels: int,
) -> _Member:
    """Member `info`, read if its sample uses it: its first image, `.txt` and `.json` (what
    `taken` does not hold yet; it is added)."""
    shown, member = escape_name(name), _Member(escape_name(ext))
    kind = "image" if ext in _IMAGE_EXTS else ext
    used = kind in ("image", *_SIDECARS) and kind not in taken
    taken.add(kind)
    limit = image_byte_limit(max_pixels) if kind == "image" else SIDECAR_MAX_BYTES
    if info.islnk() or info.issym():
        member.problem = f"member {shown} is a link; not read"
    elif not info.isreg():
        member.problem = f"member {shown} is not a regular file; not read"
    elif _leaves_shard(name):
        member.problem = f"member {shown}: its name is absolute or holds '..'; not read"
    elif not used:
        return member  # left unread
    elif info.size > limit:
        what = (
            f"an image may be with `max_pixels` {max_pixels}; not read (raise `max_pixels`)"
            if kind == "image"
            else "a .txt or .json may be; not read"
        )
        member.problem = (
            f"member {shown} is {_megabytes(info.size)}, above the {_megabytes(limit)} {what}"
        )
    else:
        reader = tar.extractfile(info)
        member.data = reader.read() if reader else b""
    return member


def _megabytes(size: int) -> str:
    return f"{size / 1e6:.1f} MB"


def _listing(items: list[str], sep: str, most: int = 8) -> str:
    """`items` joined by `sep`, each once, the first `most` of them and how many more."""
    distinct = list(dict.fromkeys(items))
    more = f"{sep}and {len(distinct) - most} more" if len(distinct) > most else ""
    return sep.join(distinct[:most]) + more


def _assemble(key: str, parts: list[_Member], seen: set[str]) -> ShardSample:
    """One sample from its members: the image, caption and metadata, or why it fails."""
    sample = ShardSample(key)
    images = [m for m in parts if m.ext in _IMAGE_EXTS]
    first = {m.ext: m.data for m in reversed(parts) if m.data is not None}  # ext -> its bytes
    problems = [m.problem for m in parts if m.problem is not None]
    if key in seen:
        problems.insert(0, _TWICE)
    seen.add(key)
    if not problems:  # else they are the reason, and the images are not looked at
        if len(images) == 1:
            sample.ext, sample.image = images[0].ext, images[0].data
        elif not images:
            members = _listing([m.ext or "(no extension)" for m in parts], ", ")
            problems.append(f"no image in this sample (members: {members})")
        else:
            count = "two" if len(images) == 2 else str(len(images))
            kinds = _listing([m.ext for m in images], ", ")
            problems.append(f"{count} images in one sample: {kinds}")
    if "txt" in first:
        sample.caption = _caption(first["txt"])
    if "json" in first:
        try:
            meta, why = json.loads(first["json"]), "its json is not a JSON object"
        except (ValueError, RecursionError) as e:
            meta, why = None, f"its json is not valid JSON ({_reason(e)})"
        if isinstance(meta, dict):
            sample.meta = meta
        elif not images:
            problems.append(why)
    sample.error = _listing(problems, "; ") or None
    return sample


def _caption(data: bytes) -> str:
    """A `.txt` member as the caption column holds it: stripped, cut to `CAPTION_MAX_CHARS`."""
    text = data.decode("utf-8", errors="replace").strip()
    if len(text) > CAPTION_MAX_CHARS:
        text = text[: CAPTION_MAX_CHARS - 1] + "\u2026"
    return text


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
        if not name or _leaves_shard(name) or "\x00" in name:
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
