"""WebDataset shards for the tests of runs over shards: PNG bytes of the random images and
tars of samples or of raw members."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

from conftest import random_image


def png(seed: int, size: tuple[int, int] = (72, 56)) -> bytes:
    """The PNG bytes of `random_image(seed, size)`."""
    buffer = io.BytesIO()
    random_image(seed, size).save(buffer, format="PNG")
    return buffer.getvalue()


def write_members(path: Path, entries: list[tuple]) -> Path:
    """A tar of `entries`: (name, bytes) for a regular member, (name, tarfile.SYMTYPE or
    LNKTYPE, target) for a link; names may hold undecodable bytes as surrogates, as tarfile
    reads them."""
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for name, *rest in entries:
            info = tarfile.TarInfo(name)
            if len(rest) == 2:
                info.type, info.linkname = rest
                tar.addfile(info)
            else:
                info.size = len(rest[0])
                tar.addfile(info, io.BytesIO(rest[0]))
    return path


def write_shard(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> Path:
    """A shard of `samples`, each (key, {extension: bytes}), in that order."""
    return write_members(
        path, [(f"{key}.{ext}", data) for key, members in samples for ext, data in members.items()]
    )
