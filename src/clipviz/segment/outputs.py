"""What a segmentation leaves on disk: the labels as a PNG, an overlay with a legend, and
optionally the class probabilities. Every file is written atomically."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..files import atomic_path
from ..render import npz_writer, save_png

LEGEND_ROWS = 24  # classes named in an overlay's legend (the largest first)
_ROW, _SWATCH, _LEGEND_WIDTH = 16, 12, 220


def palette(num_classes: int) -> np.ndarray:
    """Colours `[K, 3]` uint8 of PASCAL VOC's label colormap (class 0 black; the bits of the
    class index spread over the three channels), repeating after 256 classes."""
    colours = np.zeros((num_classes, 3), dtype=np.uint8)
    for c in range(num_classes):
        index, rgb = c % 256, [0, 0, 0]
        for shift in range(7, -1, -1):
            for channel in range(3):
                rgb[channel] |= ((index >> channel) & 1) << shift
            index >>= 3
        colours[c] = rgb
    return colours


def save_labels(path: str | os.PathLike[str], labels: np.ndarray, num_classes: int) -> None:
    """Labels `[H, W]` as a PNG whose pixel values are the class indices: an 8-bit palette
    PNG (VOC colours) up to 256 classes, a 16-bit grey PNG beyond."""
    if num_classes <= 256:
        save_png(path, labels.astype(np.uint8), palette=palette(num_classes))
        return
    with atomic_path(path) as tmp:
        Image.fromarray(labels.astype(np.uint16)).save(tmp, format="PNG")


def overlay_with_legend(
    image: np.ndarray, labels: np.ndarray, class_labels: Sequence[str], alpha: float = 0.5
) -> np.ndarray:
    """The image `[H, W, 3]` uint8 with each pixel's class colour blended in at `alpha`, and
    beside it a legend of the classes present, largest first (at most `LEGEND_ROWS`)."""
    colours = palette(len(class_labels))
    blended = (image.astype(np.float32) * (1 - alpha) + colours[labels] * alpha).astype(np.uint8)
    counts = np.bincount(labels.ravel(), minlength=len(class_labels))
    present = [int(c) for c in np.argsort(-counts, kind="stable") if counts[c]]
    rows = present[:LEGEND_ROWS]
    extra = len(present) - len(rows)
    height = max(image.shape[0], _ROW * (len(rows) + (1 if extra else 0)) + 8)
    canvas = Image.new("RGB", (image.shape[1] + _LEGEND_WIDTH, height), (255, 255, 255))
    canvas.paste(Image.fromarray(blended), (0, 0))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    x = image.shape[1] + 6
    for i, c in enumerate(rows):
        y = 4 + i * _ROW
        draw.rectangle((x, y, x + _SWATCH, y + _SWATCH), fill=tuple(int(v) for v in colours[c]),
                       outline=(0, 0, 0))  # fmt: skip
        share = 100 * counts[c] / labels.size
        draw.text((x + _SWATCH + 6, y), f"{c} {class_labels[c][:22]} {share:.1f}%",
                  fill=(0, 0, 0), font=font)  # fmt: skip
    if extra:
        draw.text((x, 4 + len(rows) * _ROW), f"+{extra} more", fill=(0, 0, 0), font=font)
    return np.asarray(canvas)


def write_segmentation(
    folder: Path,
    image: np.ndarray,
    labels: np.ndarray,
    class_labels: Sequence[str],
    probs: np.ndarray | None = None,
    alpha: float = 0.5,
) -> dict[str, str]:
    """`labels.png`, `overlay.png` and (given `probs` `[K, H, W]`) `probs.npz` (float16
    probabilities, half the bytes of float32 and ample for values in [0, 1], and the class
    labels) in `folder`; returns the files written by kind (a
    `probs.npz` of an earlier segmentation there is removed when `probs` is not given)."""
    files = {"labels": folder / "labels.png", "overlay": folder / "overlay.png"}
    save_labels(files["labels"], labels, len(class_labels))
    save_png(files["overlay"], overlay_with_legend(image, labels, class_labels, alpha))
    if probs is None:
        (folder / "probs.npz").unlink(missing_ok=True)
    else:
        files["probs"] = folder / "probs.npz"
        with npz_writer(files["probs"]) as npz:
            npz.add("probs", probs.astype(np.float16))
            npz.add("classes", np.array(list(class_labels)))
    return {k: str(v) for k, v in files.items()}


def labels_png(labels: np.ndarray, num_classes: int) -> bytes:
    """The bytes of `save_labels`'s PNG (for a shard member): palette PNG up to 256 classes,
    16-bit grey beyond."""
    import io

    buffer = io.BytesIO()
    if num_classes <= 256:
        image = Image.fromarray(labels.astype(np.uint8), mode="P")
        image.putpalette(palette(num_classes).ravel().tolist())
    else:
        image = Image.fromarray(labels.astype(np.uint16))
    image.save(buffer, format="PNG")
    return buffer.getvalue()
