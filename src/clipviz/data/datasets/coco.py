"""COCO instances layout: polygons and RLE (see `clipviz.data.datasets`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from ...errors import ClipvizError
from .common import (
    Box,
    EvalDataset,
    Sample,
    check_pixels,
    dataset_name,
    mask_box,
    missing_image,
    read_json,
    xywh_box,
)


def rle_counts_from_string(encoded: str) -> list[int]:
    """Run lengths of a COCO compressed RLE string (pycocotools' rleFrString).

    Each count is 5-bit groups, least significant first, in characters offset by 48; bit
    0x20 says another group follows, bit 0x10 of the last group is the sign. From the
    fourth count on, the stored value is the difference to the count two places before.
    """
    counts: list[int] = []
    pos = 0
    while pos < len(encoded):
        value = shift = 0
        more = True
        while more:
            if pos >= len(encoded):
                raise ValueError("compressed RLE string ends inside a count")
            group = ord(encoded[pos]) - 48
            value |= (group & 0x1F) << shift
            more = bool(group & 0x20)
            pos += 1
            shift += 5
            if not more and group & 0x10:
                value |= -1 << shift
        if len(counts) > 2:
            value += counts[-2]
        counts.append(value)
    return counts


def decode_rle(counts: Sequence[int], height: int, width: int) -> np.ndarray:
    """Bool [H, W] mask from run lengths that alternate 0s and 1s, starting with 0s.

    Runs go down the columns (column-major), as in COCO.
    """
    runs = np.asarray(counts, dtype=np.int64)
    if (runs < 0).any() or runs.sum() != height * width:
        raise ValueError(f"RLE runs sum to {runs.sum()}, not {height}x{width} pixels")
    flat = np.repeat(np.arange(runs.size) % 2 == 1, runs)
    return np.ascontiguousarray(flat.reshape(width, height).T)


def rasterize_polygons(polygons: Sequence[Sequence[float]], height: int, width: int) -> np.ndarray:
    """Bool [H, W] union of COCO polygons ([x0, y0, x1, y1, ...] each), edges included."""
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    for polygon in polygons:
        if len(polygon) >= 6:  # fewer than 3 points covers no area
            draw.polygon([float(v) for v in polygon], fill=1, outline=1)
    return np.asarray(canvas) > 0


def _coco_segmentation(segmentation: Any, height: int, width: int) -> np.ndarray:
    if isinstance(segmentation, list):
        return rasterize_polygons(segmentation, height, width)
    if isinstance(segmentation, dict):
        rle_height, rle_width = segmentation["size"]
        counts = segmentation["counts"]
        if isinstance(counts, str):
            counts = rle_counts_from_string(counts)
        if (rle_height, rle_width) != (height, width):
            raise ValueError(f"RLE size {rle_height}x{rle_width} is not the image's")
        return decode_rle(counts, height, width)
    return np.zeros((height, width), dtype=bool)


@dataclass
class _CocoImage:
    file_name: str
    width: int
    height: int
    annotations: list[dict[str, Any]]


def _open_coco(root: Path, split: str | None) -> EvalDataset:
    if root.is_file():
        json_path = root
        stem = root.stem
        split = split or (
            stem.removeprefix("instances_") if stem.startswith("instances_") else None
        )
        base = root.parent.parent if root.parent.name == "annotations" else root.parent
    else:
        split = split or "val2017"
        json_path = root / "annotations" / f"instances_{split}.json"
        if not json_path.is_file():
            found = sorted((root / "annotations").glob("instances_*.json"))
            available = ", ".join(p.stem.removeprefix("instances_") for p in found) or "none"
            raise ClipvizError(
                f"COCO root {root} has no annotations/instances_{split}.json; expected "
                f"annotations/instances_<split>.json (available splits: {available}) "
                "or pass the JSON file itself"
            )
        base = root
    data = read_json(json_path)
    try:
        categories = {c["id"]: c["name"] for c in sorted(data["categories"], key=lambda c: c["id"])}
        by_image: dict[Any, list[dict[str, Any]]] = {}
        for ann in data["annotations"]:
            by_image.setdefault(ann["image_id"], []).append(ann)
        images = [
            _CocoImage(
                im["file_name"], int(im["width"]), int(im["height"]), by_image.get(im["id"], [])
            )
            for im in sorted(data["images"], key=lambda im: im["id"])
        ]
    except (KeyError, TypeError) as err:
        raise ClipvizError(
            f"{json_path} is not a COCO instances file (missing or bad {err}); "
            "expected images, annotations and categories"
        ) from err
    folders = [base / split, base / "images" / split] if split else []
    folders += [base / "images", base]
    decode = partial(_decode_coco, json_path, folders, categories)
    return EvalDataset(
        dataset_name(base, split), base, "coco", list(categories.values()), images, decode
    )


def _decode_coco(
    json_path: Path, folders: list[Path], categories: dict[Any, str], image: _CocoImage
) -> Sample:
    check_pixels((image.width, image.height), f"{json_path}: image {image.file_name}")
    candidates = [folder / image.file_name for folder in folders]
    image_path = next((p for p in candidates if p.is_file()), candidates[0])
    if not image_path.is_file():
        raise missing_image(image_path)
    masks: dict[str, np.ndarray] = {}
    boxes: dict[str, list[Box]] = {}
    for ann in image.annotations:
        try:
            name = categories[ann["category_id"]]
            mask = _coco_segmentation(ann.get("segmentation"), image.height, image.width)
            box = xywh_box(ann["bbox"]) if ann.get("bbox") else None
        except (KeyError, TypeError, ValueError) as err:
            raise ClipvizError(
                f"annotation {ann.get('id')} of {image.file_name} in {json_path} is malformed ({err})",
                exit_code=1,
            ) from err
        masks[name] = masks[name] | mask if name in masks else mask
        if box is None and mask.any():
            box = mask_box(mask)
        if box is not None:
            boxes.setdefault(name, []).append(box)
    order = list(categories.values())
    masks = {name: masks[name] for name in order if name in masks}
    boxes = {name: boxes[name] for name in order if name in boxes}
    return Sample(image_path, (image.width, image.height), masks, boxes, None)
