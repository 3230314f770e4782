"""Pascal VOC segmentation layout (see `clipviz.data.datasets`)."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np

from ...errors import ClipvizError
from .common import (
    EvalDataset,
    Sample,
    dataset_name,
    image_size,
    mask_box,
    missing_image,
    read_png,
    require_dir,
)

VOC_CLASSES = [
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
]  # fmt: skip
VOC_IGNORE = 255


def _voc_label_names(root: Path) -> list[str]:
    """Names by label value, background first: classes.txt if present, else VOC's 20."""
    path = root / "classes.txt"
    if not path.is_file():
        return ["background", *VOC_CLASSES]
    names = [line.strip() for line in path.read_text(encoding="utf-8").strip().splitlines()]
    if len(names) < 2 or not all(names):
        raise ClipvizError(
            f"{path} needs one class name per line (line 0 the background) and no blank lines"
        )
    return names


def _read_split_list(path: Path, layout: str) -> list[str]:
    if not path.is_file():
        available = sorted(p.stem for p in path.parent.glob("*.txt"))
        raise ClipvizError(
            f"{layout} split file {path} does not exist; available splits: "
            f"{', '.join(available) or 'none'}"
        )
    return [
        line.split()[0] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()
    ]


def _open_voc(root: Path, split: str | None) -> EvalDataset:
    expected = "JPEGImages/, SegmentationClass/ and ImageSets/Segmentation/<split>.txt"
    require_dir(root, "VOC", expected)
    for folder in ("JPEGImages", "SegmentationClass"):
        if not (root / folder).is_dir():
            raise ClipvizError(f"VOC root {root} has no {folder}/ folder; expected {expected}")
    names = _voc_label_names(root)
    sets = root / "ImageSets" / "Segmentation"
    if sets.is_dir() and split != "all":
        split = split or "val"
        ids = _read_split_list(sets / f"{split}.txt", "VOC")
    else:
        ids = sorted(p.stem for p in (root / "SegmentationClass").glob("*.png"))
    return EvalDataset(
        dataset_name(root, split), root, "voc", names[1:], ids, partial(_decode_voc, root, names)
    )


def _decode_voc(root: Path, names: list[str], image_id: str) -> Sample:
    label_path = root / "SegmentationClass" / f"{image_id}.png"
    labels, mode = read_png(label_path)  # [H, W] class index per pixel
    if labels.ndim != 2:
        raise ClipvizError(
            f"{label_path} is a {mode} image; expected a palette or grayscale label PNG",
            exit_code=1,
        )
    image_path = root / "JPEGImages" / f"{image_id}.jpg"
    if not image_path.is_file() and (root / "JPEGImages" / f"{image_id}.png").is_file():
        image_path = image_path.with_suffix(".png")
    if not image_path.is_file():
        raise missing_image(image_path)
    height, width = labels.shape
    if (size := image_size(image_path)) != (width, height):
        raise ClipvizError(
            f"{image_path} is {size[0]}x{size[1]} but its labels {label_path.name} are "
            f"{width}x{height}; the mask must have the image's size",
            exit_code=1,
        )
    valid = labels != VOC_IGNORE
    masks: dict[str, np.ndarray] = {}
    for value in np.unique(labels[valid]):
        if value == 0:
            continue
        if value >= len(names):
            raise ClipvizError(
                f"{label_path} has label {value} but only {len(names) - 1} classes are named; "
                f"list them in {root / 'classes.txt'}",
                exit_code=1,
            )
        masks[names[int(value)]] = labels == value
    boxes = {name: [mask_box(mask)] for name, mask in masks.items()}
    return Sample(image_path, (width, height), masks, boxes, valid)
