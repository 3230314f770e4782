"""Generic folder layout: images/, masks/<stem>/<class>.png, boxes.json."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from pathlib import Path

import numpy as np

from ...errors import ClipvizError
from .common import (
    IMAGE_EXTENSIONS,
    Box,
    EvalDataset,
    Sample,
    dataset_name,
    image_size,
    mask_box,
    read_json,
    read_png,
    require_dir,
)


def _read_generic_boxes(path: Path) -> dict[str, dict[str, list[Box]]]:
    if not path.is_file():
        return {}
    data = read_json(path)
    try:
        return {
            image: {name: [_as_box(b) for b in boxes] for name, boxes in per_class.items()}
            for image, per_class in data.items()
        }
    except (AttributeError, TypeError, ValueError) as err:
        raise ClipvizError(
            f"{path} is malformed ({err}); expected "
            '{"<image file or stem>": {"<class>": [[x0, y0, x1, y1], ...]}}'
        ) from err


def _as_box(values: Sequence[float]) -> Box:
    x0, y0, x1, y1 = (float(v) for v in values)
    return (x0, y0, x1, y1)


def _binary_mask(path: Path) -> np.ndarray:
    """Bool [H, W]: any nonzero colour; a transparent pixel is background."""
    pixels, mode = read_png(path)
    if pixels.ndim == 2:
        return pixels != 0
    if mode in ("RGBA", "LA"):
        return np.any(pixels[..., :-1], axis=-1) & (pixels[..., -1] > 0)
    return np.any(pixels, axis=-1)


def _open_generic(root: Path, split: str | None) -> EvalDataset:
    expected = "images/<stem>.<ext>, optional masks/<stem>/<class>.png and boxes.json"
    require_dir(root, "generic", expected)
    if split not in (None, "all"):
        raise ClipvizError(f"generic dataset {root} has no splits; leave the split unset")
    if not (root / "images").is_dir():
        raise ClipvizError(f"generic root {root} has no images/ folder; expected {expected}")
    listing = (root / "images").iterdir()
    images = sorted(p for p in listing if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    box_table = _read_generic_boxes(root / "boxes.json")
    mask_classes = {p.stem for p in (root / "masks").glob("*/*.png")}
    classes = mask_classes | {name for per_class in box_table.values() for name in per_class}
    if not classes:
        raise ClipvizError(
            f"generic dataset {root} has no masks/<stem>/<class>.png and no boxes.json: "
            f"nothing to score the maps against; expected {expected}"
        )
    entries = [(p, box_table.get(p.name, box_table.get(p.stem, {}))) for p in images]
    decode = partial(_decode_generic, root)
    return EvalDataset(
        dataset_name(root, split), root, "generic", sorted(classes), entries, decode,
        has_masks=bool(mask_classes),
    )  # fmt: skip


def _decode_generic(root: Path, entry: tuple[Path, dict[str, list[Box]]]) -> Sample:
    image_path, listed_boxes = entry
    width, height = image_size(image_path)
    masks: dict[str, np.ndarray] = {}
    for mask_path in sorted((root / "masks" / image_path.stem).glob("*.png")):
        mask = _binary_mask(mask_path)
        if mask.shape != (height, width):
            raise ClipvizError(
                f"mask {mask_path} is {mask.shape[1]}x{mask.shape[0]} but image {image_path} "
                f"is {width}x{height}; resize the mask to the image",
                exit_code=1,
            )
        masks[mask_path.stem] = mask
    boxes = {name: list(b) for name, b in listed_boxes.items()}
    for name, mask in masks.items():
        if name not in boxes and mask.any():
            boxes[name] = [mask_box(mask)]
    return Sample(image_path, (width, height), masks, boxes, None)
