"""Evaluation dataset readers: Pascal VOC, COCO instances, CUB-200-2011 and a generic folder.

`open_dataset` lists a split's samples; annotations are decoded only in `EvalDataset[i]`.
Conventions shared by every layout:

- `Sample.size` is (width, height); masks are bool [H, W]; boxes are (x0, y0, x1, y1) in
  pixels with x1/y1 exclusive. `Sample.valid` is False where the label means "ignore"
  (VOC 255; always an array for VOC) and None for layouts without an ignore label.
- A listed image that is missing or unreadable raises `ClipvizError(exit_code=1)` from
  `EvalDataset[i]`, so an evaluator can record one failed image and go on.
- `limit` keeps the first N samples in the layout's order: the split file's order (VOC,
  sorted in the official sets), image id (COCO, CUB), file name (folder listings).

Layouts:

- voc: `JPEGImages/<id>.jpg` (or .png), `SegmentationClass/<id>.png` (palette or grayscale;
  value = class index, 0 background, 255 ignore), `ImageSets/Segmentation/<split>.txt`
  (default "val"; without that folder, or with split "all", every label PNG is a sample).
  Extension: `<root>/classes.txt`, one name per line, line i naming label i and line 0 the
  background, replaces the 20 VOC names (synthetic sets use it). Boxes come from the masks:
  one box per class around all of its pixels.
- coco: `root` is the instances JSON or a folder with `annotations/instances_<split>.json`
  (default "val2017"); images are looked up under `<split>/`, `images/<split>/`, `images/`
  and the folder itself. Polygons are filled with PIL (edge pixels may differ from
  pycocotools by one), RLE may be plain or compressed. Crowd annotations are included in
  masks and boxes. A class's mask is the union of its instances; one box per instance.
- cub: `images.txt`, `bounding_boxes.txt`, `image_class_labels.txt`, `classes.txt`,
  optional `train_test_split.txt` (split "train", "test", or None/"all"), images under
  `images/`. Box only: one box per image, under the class name without its number and
  with spaces for underscores ("001.Black_footed_Albatross" -> "Black footed Albatross").
- generic: `images/<stem>.<ext>`, `masks/<stem>/<class>.png` (any nonzero pixel is the
  class; alpha is not), optional `boxes.json` {"<file name or stem>": {"<class>": [[x0, y0,
  x1, y1], ...]}}. A class with a mask but no listed box gets the box around its mask.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ...errors import ClipvizError
from .coco import _open_coco, decode_rle, rasterize_polygons, rle_counts_from_string
from .common import LAYOUT_NAMES, Box, EvalDataset, Format, Sample, mask_box, xywh_box
from .cub import _open_cub, cub_display_name
from .generic import _open_generic
from .voc import VOC_CLASSES, VOC_IGNORE, _open_voc

__all__ = [
    "LAYOUT_NAMES",
    "READERS",
    "VOC_CLASSES",
    "VOC_IGNORE",
    "Box",
    "EvalDataset",
    "Format",
    "Sample",
    "cub_display_name",
    "decode_rle",
    "mask_box",
    "open_dataset",
    "rasterize_polygons",
    "rle_counts_from_string",
    "xywh_box",
]

READERS: dict[str, Callable[[Path, str | None], EvalDataset]] = {
    "voc": _open_voc,
    "coco": _open_coco,
    "cub": _open_cub,
    "generic": _open_generic,
}


def open_dataset(
    root: str | Path, fmt: Format, split: str | None = None, limit: int | None = None
) -> EvalDataset:
    """Open an evaluation dataset.

    fmt: "voc", "coco", "cub" or "generic" (layouts in the module docstring).
    split: the layout's split name; None picks its default. limit: keep the first N samples.
    """
    path = Path(root).expanduser()
    if fmt not in READERS:
        raise ClipvizError(f"unknown dataset format {fmt!r}; use one of {', '.join(READERS)}")
    if not path.exists():
        raise ClipvizError(f"{LAYOUT_NAMES[fmt]} root {path} does not exist; check the path")
    if limit is not None and limit < 0:
        raise ClipvizError(f"limit must be 0 or more, got {limit}")
    dataset = READERS[fmt](path, split)
    return dataset if limit is None else dataset[:limit]
