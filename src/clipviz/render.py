"""Colormaps, heatmaps blended over images and the files of an explanation (PNG, NPZ), written
atomically."""

from __future__ import annotations

import contextlib
import functools
import os
import re
import struct
import zipfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from isal import isal_zlib
from PIL import Image

from .errors import ClipvizError
from .files import atomic_path


def _poly(coeffs: Sequence[Sequence[float]]) -> Callable[[np.ndarray], np.ndarray]:
    c = np.asarray(coeffs, dtype=np.float64)  # [degree+1, 3]

    def cmap(t: np.ndarray) -> np.ndarray:
        powers = np.stack([t**i for i in range(len(c))], axis=-1)  # [..., degree+1]
        return powers @ c

    return cmap


def _jet(t: np.ndarray) -> np.ndarray:
    return np.stack([1.5 - np.abs(4 * t - k) for k in (3, 2, 1)], axis=-1)


# Polynomial fits of matplotlib's perceptual maps (Matt Zucker, CC0) and Google's Turbo.
_COLORMAPS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "jet": _jet,
    "turbo": _poly(
        [
            [0.13572138, 0.09140261, 0.10667330],
            [4.61539260, 2.19418839, 12.64194608],
            [-42.66032258, 4.84296658, -60.58204836],
            [132.13108234, -14.18503333, 110.36276771],
            [-152.94239396, 4.27729857, -89.90310912],
            [59.28637943, 2.82956604, 27.34824973],
        ]
    ),
    "viridis": _poly(
        [
            [0.2777273272234177, 0.005407344544966578, 0.3340998053353061],
            [0.1050930431085774, 1.404613529898575, 1.384590162594685],
            [-0.3308618287255563, 0.214847559468213, 0.09509516302823659],
            [-4.634230498983486, -5.799100973351585, -19.33244095627987],
            [6.228269936347081, 14.17993336680509, 56.69055260068105],
            [4.776384997670288, -13.74514537774601, -65.35303263337234],
            [-5.435455855934631, 4.645852612178535, 26.3124352495832],
        ]
    ),
    "inferno": _poly(
        [
            [0.0002189403691192265, 0.001651004631001012, -0.01948089843709184],
            [0.1065134194856116, 0.5639564367884091, 3.932712388889277],
            [11.60249308247187, -3.972853965665698, -15.9423941062914],
            [-41.70399613139459, 17.43639888205313, 44.35414519872813],
            [77.162935699427, -33.40235894210092, -81.80730925738993],
            [-71.31942824499214, 32.62606426397723, 73.20951985803202],
            [25.13112622477341, -12.24266895238567, -23.07032500287172],
        ]
    ),
    "gray": lambda t: np.repeat(t[..., None], 3, axis=-1),
}
COLORMAPS = tuple(_COLORMAPS)


def colormap_function(name: str) -> Callable[[np.ndarray], np.ndarray]:
    """`t` in [0, 1] -> RGB in [0, 1]: one of clipviz's own (no matplotlib needed), or any
    matplotlib colormap by name (`magma`, `RdBu_r`, `cividis`, …)."""
    if name in _COLORMAPS:
        return _COLORMAPS[name]
    try:
        import matplotlib

        cmap = matplotlib.colormaps[name]
    except (ImportError, KeyError):
        raise ClipvizError(
            f"unknown colormap {name!r}; choose from: {', '.join(COLORMAPS)}, or any "
            "matplotlib colormap name"
        ) from None
    return lambda t: np.asarray(cmap(t))[..., :3]


# Maps are coloured through a table of this many levels, as matplotlib colours them: a
# gather per pixel instead of a polynomial, and the heatmap of a map is one of 256 colours.
LEVELS = 256


@functools.lru_cache(maxsize=16)
def colormap_table(name: str) -> np.ndarray:
    """uint8 `[LEVELS, 3]`: the colour of each level of colormap `name` (matplotlib's own
    table for its maps; clipviz's at the centre of each level's interval)."""
    if name not in _COLORMAPS:
        with contextlib.suppress(ImportError, KeyError):
            import matplotlib

            cmap = matplotlib.colormaps[name].resampled(LEVELS)
            return (np.asarray(cmap(np.arange(LEVELS)))[:, :3] * 255.0 + 0.5).astype(np.uint8)
    rgb = colormap_function(name)((np.arange(LEVELS) + 0.5) / LEVELS)
    return (np.clip(rgb, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def map_levels(norm_map: np.ndarray) -> np.ndarray:
    """A map in [0, 1] -> uint8 levels `floor(t·LEVELS)` (1 is the top level; NaN -> 0)."""
    t = np.multiply(norm_map, LEVELS, dtype=np.float32)
    np.clip(t, 0, LEVELS - 1, out=t)
    missing = np.isnan(t)
    if missing.any():
        t[missing] = 0
    return t.astype(np.uint8)


def colorize(norm_map: np.ndarray, colormap: str = "jet") -> np.ndarray:
    """A `[H, W]` map in [0, 1] -> uint8 RGB `[H, W, 3]`; NaN (no data) -> RGBA `[H, W, 4]`
    with those pixels transparent."""
    out = np.take(colormap_table(colormap), map_levels(norm_map), axis=0)
    missing = np.isnan(norm_map)
    if missing.any():
        alpha = np.where(missing, 0, 255).astype(np.uint8)
        out = np.concatenate([out, alpha[..., None]], axis=-1)
    return out


def save_heatmap(path: str | os.PathLike[str], norm_map: np.ndarray, colormap: str) -> None:
    """The heatmap of a `[H, W]` map in [0, 1] as a PNG: the colormap's levels as a palette
    (pixels with no data, NaN, make it an RGBA picture with them transparent)."""
    if np.isnan(norm_map).any():
        save_png(path, colorize(norm_map, colormap))
    else:
        save_png(path, map_levels(norm_map), palette=colormap_table(colormap))


def blend_heatmap(
    image: np.ndarray, norm_map: np.ndarray, colormap: str = "jet", alpha: float = 0.5
) -> np.ndarray:
    """Blend the colorized map over `image` (uint8 `[H, W, 3]`): `(1-α)·image + α·heat` in
    8-bit fixed point (α to the nearest 1/256, rounded half up); where the map is NaN (no
    data) the image shows as it is."""
    if not 0.0 <= alpha <= 1.0:
        raise ClipvizError(f"`alpha` {alpha} is outside [0, 1]")
    w = round(alpha * 256)
    heat = colormap_table(colormap).astype(np.uint16) * w + 128  # the colour's share, rounding
    out = np.multiply(image, 256 - w, dtype=np.uint16)
    out += np.take(heat, map_levels(norm_map), axis=0)
    out >>= 8
    blended = out.astype(np.uint8)
    missing = np.isnan(norm_map)
    if missing.any():
        blended[missing] = image[missing]
    return blended


def prompt_slugs(prompts: Sequence[str], max_len: int = 60) -> list[str]:
    """File-name-safe, unique slugs: "A red car!" -> "a-red-car"."""
    slugs: list[str] = []
    for p in prompts:
        base = re.sub(r"[^a-z0-9]+", "-", p.lower()).strip("-")[:max_len].strip("-") or "prompt"
        slug, n = base, 2
        while slug in slugs:
            slug, n = f"{base}-{n}", n + 1
        slugs.append(slug)
    return slugs


# deflate level: ISA-L's fastest with matching, which keeps the writers behind the model
PNG_LEVEL = 1


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return (
        struct.pack(">I", len(data))
        + kind
        + data
        + struct.pack(">I", isal_zlib.crc32(data, isal_zlib.crc32(kind)))
    )


def encode_png(
    pixels: np.ndarray, level: int = PNG_LEVEL, palette: np.ndarray | None = None
) -> bytes:
    """uint8 `[H, W]`, `[H, W, 3]` or `[H, W, 4]` -> PNG bytes: every row "Up"-filtered
    (the difference to the row above, one numpy subtraction) and deflated by ISA-L.
    Pillow's encoder chooses a filter per row, which costs more than the deflate itself.

    palette: uint8 `[n, 3]`; with it, `[H, W]` pixels are indices into it (a colormapped
    heatmap in a third of the bytes of its RGB).
    """
    a = np.asarray(pixels)
    if a.dtype != np.uint8 or a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (3, 4)):
        raise ValueError(f"encode_png takes uint8 [H, W(, 3|4)], got {a.dtype} {a.shape}")
    if palette is not None and (a.ndim != 2 or not 1 <= len(palette) <= 256):
        raise ValueError("a palette PNG takes [H, W] indices and at most 256 colours")
    h, w = a.shape[:2]
    channels = 1 if a.ndim == 2 else a.shape[2]
    rows = a.reshape(h, w * channels)
    filtered = np.empty((h, w * channels + 1), np.uint8)
    filtered[:, 0] = 2  # filter type Up
    filtered[0, 1:] = rows[0]
    np.subtract(rows[1:], rows[:-1], out=filtered[1:, 1:])
    colour_type = 3 if palette is not None else {1: 0, 3: 2, 4: 6}[channels]
    header = struct.pack(">IIBBBBB", w, h, 8, colour_type, 0, 0, 0)
    chunks = [_png_chunk(b"IHDR", header)]
    if palette is not None:
        chunks.append(_png_chunk(b"PLTE", np.ascontiguousarray(palette, np.uint8).tobytes()))
    # ISA-L's level 1 deflates an overlay in two thirds of the time of zlib-ng's Huffman-only
    # coding, into 10 % fewer bytes (and a palette heatmap in 60 % of zlib-ng level 1's bytes)
    idat = isal_zlib.compress(filtered.data, level)
    chunks.append(_png_chunk(b"IDAT", idat))
    chunks.append(_png_chunk(b"IEND", b""))
    return b"".join([b"\x89PNG\r\n\x1a\n", *chunks])


def save_png(
    path: str | os.PathLike[str], rgb: np.ndarray, palette: np.ndarray | None = None
) -> None:
    """Write `rgb` (or palette indices, see `encode_png`) as a PNG file, atomically."""
    data = encode_png(rgb, palette=palette)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def _deflate_with_isal(entry: Any) -> None:
    """Deflate a zip entry being written with ISA-L (the same format, in a fraction of the
    time of the system zlib): zipfile has no public hook for its compressor, so the entry's
    own is swapped; a zipfile without that attribute keeps its own."""
    if hasattr(entry, "_compressor") and entry._compressor is not None:
        entry._compressor = isal_zlib.compressobj(1, isal_zlib.DEFLATED, -15)


class NpzWriter:
    """Arrays written one at a time into an open NPZ (see `npz_writer`)."""

    def __init__(self, zf: zipfile.ZipFile) -> None:
        self._zf = zf

    def add(self, name: str, array: np.ndarray) -> None:
        with self._zf.open(f"{name}.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array(f, np.asanyarray(array), allow_pickle=False)

    @contextlib.contextmanager
    def rows(
        self, name: str, shape: tuple[int, ...], dtype: Any
    ) -> Iterator[Callable[[np.ndarray], None]]:
        """An array of `shape` written row by row (`shape[0]` rows, in order): the caller
        never holds more than one row."""
        dt = np.dtype(dtype)
        with self._zf.open(f"{name}.npy", "w", force_zip64=True) as f:
            _deflate_with_isal(f)
            header = {"descr": np.lib.format.dtype_to_descr(dt), "fortran_order": False,
                      "shape": tuple(shape)}  # fmt: skip
            np.lib.format.write_array_header_1_0(f, header)
            written = [0]

            def write(row: np.ndarray) -> None:
                f.write(np.ascontiguousarray(row, dtype=dt).tobytes())
                written[0] += 1

            yield write
            if written[0] != shape[0]:
                raise ValueError(f"{name}: {written[0]} rows written, {shape[0]} declared")


@contextlib.contextmanager
def npz_writer(path: str | os.PathLike[str]) -> Iterator[NpzWriter]:
    """Write a compressed NPZ one array (or one row) at a time, so a file of many large maps
    never needs them all in memory; atomically. `np.load` reads it like `np.savez`'s."""
    with (
        atomic_path(path) as tmp,
        zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as zf,
    ):
        yield NpzWriter(zf)


def load_npz(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Read an NPZ written by clipviz without ever unpickling."""
    with np.load(Path(path), allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def comparison_sheet(
    image: np.ndarray,
    maps: dict[str, np.ndarray],
    prompts: Sequence[str],
    colormap: str = "jet",
    alpha: float = 0.5,
    cell: int = 224,
    scores: Sequence[float] | None = None,
) -> np.ndarray:
    """One picture comparing methods: the image, then one column per method; one row per
    prompt, labelled with the whole prompt (wrapped, never cut) and its `scores` entry (the
    model's probability); a colorbar at the right says which end of the colormap is high.

    image: uint8 `[H, W, 3]`; maps: method -> normalised maps `[T, H, W]` in [0, 1].
    Each cell is scaled so its longer side is `cell` pixels.
    """
    import textwrap

    from PIL import ImageDraw, ImageFont

    h, w = image.shape[:2]
    scale = cell / max(h, w)
    cw, ch = max(1, round(w * scale)), max(1, round(h * scale))
    small = np.asarray(Image.fromarray(image).resize((cw, ch), Image.Resampling.BILINEAR))
    font = ImageFont.load_default(size=14)
    label_w, header_h, pad, line_h, bar_w = 150, 24, 4, 16, 44
    methods = list(maps)
    labels = []
    for t, prompt in enumerate(prompts):
        lines = textwrap.wrap(prompt, 18, break_long_words=True) or [""]
        if scores is not None:
            lines.append(f"p = {scores[t]:.3f}")
        labels.append(lines)
    row_h = [max(ch, len(lines) * line_h + 4) for lines in labels]
    columns = ["image", *methods]
    width = label_w + len(columns) * (cw + pad) + bar_w
    sheet = Image.new("RGB", (width, header_h + sum(r + pad for r in row_h)), "white")
    draw = ImageDraw.Draw(sheet)
    for j, name in enumerate(columns):
        draw.text((label_w + j * (cw + pad) + 4, 4), name, fill="black", font=font)
    y = header_h
    for i, lines in enumerate(labels):
        top = y + max(0, (row_h[i] - len(lines) * line_h) // 2)
        for k, line in enumerate(lines):
            colour = "dimgray" if scores is not None and k == len(lines) - 1 else "black"
            draw.text((4, top + k * line_h), line, fill=colour, font=font)
        sheet.paste(Image.fromarray(small), (label_w, y))
        for j, method in enumerate(methods):
            norm = np.asarray(
                Image.fromarray(maps[method][i].astype(np.float32)).resize(
                    (cw, ch), Image.Resampling.BILINEAR
                )
            )
            sheet.paste(
                Image.fromarray(blend_heatmap(small, norm, colormap, alpha)),
                (label_w + (j + 1) * (cw + pad), y),
            )
        y += row_h[i] + pad
    # colorbar: high at the top, as the maps' maxima
    x0, bar_h = width - bar_w + 6, max(ch, 40)
    ramp = colorize(np.linspace(1.0, 0.0, bar_h)[:, None].repeat(12, axis=1), colormap)
    sheet.paste(Image.fromarray(ramp[..., :3]), (x0, header_h))
    small_font = ImageFont.load_default(size=11)
    draw.text((x0 + 14, header_h - 2), "max", fill="black", font=small_font)
    draw.text((x0 + 14, header_h + bar_h - 12), "min", fill="black", font=small_font)
    return np.asarray(sheet)
