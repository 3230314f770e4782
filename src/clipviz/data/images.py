"""Image loading that survives real folders: EXIF, odd modes, 16-bit, truncated files, bombs."""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

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
        if path.is_symlink():
            raise ImageError("dangling or looping symbolic link; its target cannot be read")
        raise ImageError("not a file" if path.exists() else "no such file")
    return _decode(path, max_pixels)


def load_image_bytes(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode an encoded image held in memory (a tar member, say) exactly as `load_image`
    decodes a file, or raise `ImageError` with the reason."""
    return _decode(io.BytesIO(data), max_pixels)


def _decode(source: Path | BinaryIO, max_pixels: int) -> Image.Image:
    """The body shared by `load_image` and `load_image_bytes`."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        old_limit = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None  # our own limit below replaces PIL's
        try:
            with Image.open(source) as im:
                w, h = im.size
                if w * h > max_pixels:
                    raise ImageError(
                        f"image is {w}x{h} ({w * h / 1e6:.0f} MP), above the limit of "
                        f"{max_pixels / 1e6:g} MP; raise it with `max_pixels`"
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
