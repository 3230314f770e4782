"""What every dataset layout shares: `Sample`, `EvalDataset` and the readers' helpers."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, overload

import numpy as np
from PIL import Image

from ...errors import ClipvizError

Box = tuple[float, float, float, float]
Format = Literal["voc", "coco", "cub", "generic"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
LAYOUT_NAMES = {"voc": "VOC", "coco": "COCO", "cub": "CUB", "generic": "generic"}


@dataclass
class Sample:
    """One image with its ground truth."""

    image_path: Path
    size: tuple[int, int]  # (width, height)
    masks: dict[str, np.ndarray] = field(default_factory=dict)  # class -> bool [H, W]
    boxes: dict[str, list[Box]] = field(default_factory=dict)  # class -> [(x0, y0, x1, y1)]
    valid: np.ndarray | None = None  # bool [H, W]; None = every pixel labelled

    @property
    def classes(self) -> list[str]:
        """Classes present in this image: the mask classes, then box-only ones."""
        return list(dict.fromkeys([*self.masks, *self.boxes]))


@dataclass(eq=False)
class EvalDataset(Sequence[Sample]):
    """The samples of one dataset split; each is decoded when indexed."""

    name: str
    root: Path
    format: str
    classes: list[str]  # every class name of the dataset, in label order
    entries: list[Any]  # what `decode` needs for one sample: an id, a path, a record
    decode: Callable[[Any], Sample]
    has_masks: bool = True  # False: boxes only (CUB, a generic set without masks/)

    def __len__(self) -> int:
        return len(self.entries)

    @overload
    def __getitem__(self, index: int) -> Sample: ...

    @overload
    def __getitem__(self, index: slice) -> EvalDataset: ...

    def __getitem__(self, index: int | slice) -> Sample | EvalDataset:
        if isinstance(index, slice):
            return replace(self, entries=self.entries[index])
        return self.decode(self.entries[index])

    def entry_name(self, index: int) -> str:
        """What to call sample `index` in a report before (or without) decoding it: its image
        file where the entry names one."""
        entry = self.entries[index]
        if isinstance(entry, tuple) and entry and isinstance(entry[0], Path):
            return str(entry[0])
        for attr in ("file_name", "image_path"):
            if hasattr(entry, attr):
                return str(getattr(entry, attr))
        return str(entry)

    def __repr__(self) -> str:
        return f"EvalDataset({self.name!r}, format={self.format!r}, samples={len(self)})"


def require_dir(root: Path, layout: str, expected: str) -> None:
    if not root.is_dir():
        raise ClipvizError(f"{layout} root {root} is not a folder; expected {expected}")


def dataset_name(root: Path, split: str | None) -> str:
    return root.name if split is None else f"{root.name}:{split}"


def missing_image(path: Path) -> ClipvizError:
    return ClipvizError(
        f"image {path} is listed in the dataset but missing; restore it or drop it from the list",
        exit_code=1,
    )


# An annotation (or a declared image size) above this is refused before anything of its size
# is allocated: a COCO entry declaring 100000 x 100000 must not reach the OOM killer.
MAX_ANNOTATION_PIXELS = 100_000_000


def check_pixels(size: tuple[int, int], where: Path | str) -> None:
    """Refuse a (width, height) above `MAX_ANNOTATION_PIXELS` (the image fails, the run goes on)."""
    w, h = size
    if w < 1 or h < 1 or w * h > MAX_ANNOTATION_PIXELS:
        raise ClipvizError(
            f"{where} declares {w}x{h} pixels, outside 1…{MAX_ANNOTATION_PIXELS / 1e6:g} MP; "
            "fix its size or drop it from the dataset",
            exit_code=1,
        )


def crop_sample(sample: Sample, box: tuple[int, int, int, int]) -> Sample:
    """The ground truth inside `box` (left, top, right, bottom): masks, valid pixels and boxes
    cut to it and shifted; classes with nothing left inside are dropped."""
    left, top, right, bottom = box
    if (left, top, right, bottom) == (0, 0, *sample.size):
        return sample
    masks = {c: m[top:bottom, left:right] for c, m in sample.masks.items()}
    masks = {c: m for c, m in masks.items() if m.any()}
    boxes: dict[str, list[Box]] = {}
    for c, bs in sample.boxes.items():
        cut = [
            (max(x0, left) - left, max(y0, top) - top, min(x1, right) - left, min(y1, bottom) - top)
            for x0, y0, x1, y1 in bs
        ]
        cut = [b for b in cut if b[2] > b[0] and b[3] > b[1]]
        if cut and (c in masks or c not in sample.masks):
            boxes[c] = cut
    valid = None if sample.valid is None else sample.valid[top:bottom, left:right]
    return Sample(sample.image_path, (right - left, bottom - top), masks, boxes, valid)


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the image header, without decoding the pixels."""
    if not path.is_file():
        raise missing_image(path)
    try:
        with Image.open(path) as image:
            return image.size
    except (OSError, Image.DecompressionBombError) as err:
        raise ClipvizError(f"cannot read image {path} ({err}); replace it", exit_code=1) from err


def read_png(path: Path) -> tuple[np.ndarray, str]:
    """Pixels and PIL mode of an annotation PNG (palette PNGs give their indices)."""
    if not path.is_file():
        raise ClipvizError(f"annotation {path} is missing; restore it", exit_code=1)
    try:
        with Image.open(path) as image:
            check_pixels(image.size, path)
            return np.asarray(image), image.mode
    except (OSError, Image.DecompressionBombError) as err:
        raise ClipvizError(f"cannot read annotation {path} ({err})", exit_code=1) from err


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ClipvizError(f"cannot read {path} as JSON ({err}); fix or replace the file") from err


def mask_box(mask: np.ndarray) -> Box:
    """The box (x0, y0, x1, y1), x1/y1 exclusive, around the True pixels of a non-empty mask."""
    ys, xs = np.nonzero(mask)
    return (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))


def xywh_box(values: Sequence[float | str]) -> Box:
    """(x, y, width, height), as COCO and CUB store a box, to (x0, y0, x1, y1)."""
    x, y, w, h = (float(v) for v in values)
    return (x, y, x + w, y + h)
