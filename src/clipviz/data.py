"""Image loading that survives real folders, and collecting the inputs of a run."""

from __future__ import annotations

import contextlib
import glob
import os
import sys
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ClipvizError

DEFAULT_MAX_PIXELS = 100_000_000
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
    | {".jfif", ".tga", ".ico", ".jp2", ".j2k", ".dib", ".pcx", ".sgi", ".eps", ".im", ".psd"}
)


class ImageError(Exception):
    """An input file that cannot be used as an image; the message is the reason."""


def _to_8bit(arr: np.ndarray) -> np.ndarray:
    """Scale integer or float image data to uint8 by its type's range (16-bit -> /257)."""
    if arr.dtype == np.uint8:
        return arr
    if np.issubdtype(arr.dtype, np.floating):
        lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
        scale = 255.0 if hi <= 1.0 and lo >= 0.0 else 255.0 / max(hi - lo, 1e-12)
        base = 0.0 if hi <= 1.0 and lo >= 0.0 else lo
        return np.clip((np.nan_to_num(arr) - base) * scale, 0, 255).astype(np.uint8)
    hi = int(arr.max()) if arr.size else 0
    top = 255 if hi <= 255 else 65535 if hi <= 65535 else int(np.iinfo(arr.dtype).max)
    return np.clip(arr.astype(np.float64) * (255.0 / top), 0, 255).round().astype(np.uint8)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB: 16-bit and float data rescaled, transparency over white."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        return Image.fromarray(_to_8bit(np.asarray(image))).convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode != "RGB":
        return image.convert("RGB")
    return image


def load_image(path: str | os.PathLike[str], max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode `path` to an upright 8-bit RGB image, or raise `ImageError` with the reason.

    EXIF orientation is applied; grayscale, palette, RGBA, CMYK and 16-bit images are
    converted; images above `max_pixels` are refused before they are decoded.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageError("no such file")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        old_limit = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None  # our own limit below replaces PIL's
        try:
            with Image.open(path) as im:
                w, h = im.size
                if w * h > max_pixels:
                    raise ImageError(
                        f"image is {w}x{h} ({w * h / 1e6:.0f} MP), above the limit of "
                        f"{max_pixels / 1e6:g} MP; raise it with --max-pixels"
                    )
                im.seek(0)
                im.load()
                upright: Image.Image = im
                # A broken EXIF block should not lose the image.
                with contextlib.suppress(Exception):
                    upright = ImageOps.exif_transpose(im) or im
                return to_rgb(upright)
        except UnidentifiedImageError:
            raise ImageError("not an image (or a format Pillow cannot read)") from None
        except ImageError:
            raise
        except (OSError, ValueError, SyntaxError, EOFError) as e:
            raise ImageError(f"corrupt or truncated image ({e})") from None
        finally:
            Image.MAX_IMAGE_PIXELS = old_limit


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
