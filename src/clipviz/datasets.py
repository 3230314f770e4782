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

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, Literal, overload

import numpy as np
from PIL import Image, ImageDraw

from clipviz.errors import ClipvizError

Box = tuple[float, float, float, float]
Format = Literal["voc", "coco", "cub", "generic"]

VOC_CLASSES = [
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
]  # fmt: skip
VOC_IGNORE = 255
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

    def __repr__(self) -> str:
        return f"EvalDataset({self.name!r}, format={self.format!r}, samples={len(self)})"


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


# --- shared helpers -------------------------------------------------------------------


def _require_dir(root: Path, layout: str, expected: str) -> None:
    if not root.is_dir():
        raise ClipvizError(f"{layout} root {root} is not a folder; expected {expected}")


def _name(root: Path, split: str | None) -> str:
    return root.name if split is None else f"{root.name}:{split}"


def _missing_image(path: Path) -> ClipvizError:
    return ClipvizError(
        f"image {path} is listed in the dataset but missing; restore it or drop it from the list",
        exit_code=1,
    )


def _image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the image header, without decoding the pixels."""
    if not path.is_file():
        raise _missing_image(path)
    try:
        with Image.open(path) as image:
            return image.size
    except OSError as err:
        raise ClipvizError(f"cannot read image {path} ({err}); replace it", exit_code=1) from err


def _read_png(path: Path) -> tuple[np.ndarray, str]:
    """Pixels and PIL mode of an annotation PNG (palette PNGs give their indices)."""
    if not path.is_file():
        raise ClipvizError(f"annotation {path} is missing; restore it", exit_code=1)
    try:
        with Image.open(path) as image:
            return np.asarray(image), image.mode
    except OSError as err:
        raise ClipvizError(f"cannot read annotation {path} ({err})", exit_code=1) from err


def _read_json(path: Path) -> Any:
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


# --- Pascal VOC -----------------------------------------------------------------------


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
    _require_dir(root, "VOC", expected)
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
        _name(root, split), root, "voc", names[1:], ids, partial(_decode_voc, root, names)
    )


def _decode_voc(root: Path, names: list[str], image_id: str) -> Sample:
    label_path = root / "SegmentationClass" / f"{image_id}.png"
    labels, mode = _read_png(label_path)  # [H, W] class index per pixel
    if labels.ndim != 2:
        raise ClipvizError(
            f"{label_path} is a {mode} image; expected a palette or grayscale label PNG",
            exit_code=1,
        )
    image_path = root / "JPEGImages" / f"{image_id}.jpg"
    if not image_path.is_file() and (root / "JPEGImages" / f"{image_id}.png").is_file():
        image_path = image_path.with_suffix(".png")
    if not image_path.is_file():
        raise _missing_image(image_path)
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
    height, width = labels.shape
    return Sample(image_path, (width, height), masks, boxes, valid)


# --- COCO -----------------------------------------------------------------------------


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
    data = _read_json(json_path)
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
    return EvalDataset(_name(base, split), base, "coco", list(categories.values()), images, decode)


def _decode_coco(
    json_path: Path, folders: list[Path], categories: dict[Any, str], image: _CocoImage
) -> Sample:
    candidates = [folder / image.file_name for folder in folders]
    image_path = next((p for p in candidates if p.is_file()), candidates[0])
    if not image_path.is_file():
        raise _missing_image(image_path)
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


# --- CUB-200-2011 ---------------------------------------------------------------------


def _read_table(path: Path) -> dict[str, str]:
    """`id rest-of-line` rows as {id: rest}."""
    rows = (line.split(maxsplit=1) for line in path.read_text(encoding="utf-8").splitlines())
    return {row[0]: row[1].strip() if len(row) > 1 else "" for row in rows if row}


def _number(image_id: str) -> int:
    return int(image_id) if image_id.isdigit() else 0


def cub_display_name(name: str) -> str:
    """ "001.Black_footed_Albatross" -> "Black footed Albatross"."""
    number, dot, rest = name.partition(".")
    return (rest if dot and number.isdigit() else name).replace("_", " ")


def _open_cub(root: Path, split: str | None) -> EvalDataset:
    required = ["images.txt", "bounding_boxes.txt", "image_class_labels.txt", "classes.txt"]
    expected = f"{', '.join(required)} and images/"
    _require_dir(root, "CUB", expected)
    for file_name in required:
        if not (root / file_name).is_file():
            raise ClipvizError(f"CUB root {root} has no {file_name}; expected {expected}")
    paths, box_rows, labels, class_rows = (_read_table(root / f) for f in required)
    ids = sorted(paths, key=_number)
    if split not in (None, "all"):
        split_path = root / "train_test_split.txt"
        if split not in ("train", "test"):
            raise ClipvizError(f"unknown CUB split {split!r} for {root}; use train, test or all")
        if not split_path.is_file():
            raise ClipvizError(f"CUB root {root} has no train_test_split.txt for split {split!r}")
        is_training = _read_table(split_path)
        ids = [i for i in ids if is_training.get(i) == ("1" if split == "train" else "0")]
    class_names = {cid: cub_display_name(name) for cid, name in class_rows.items()}
    entries = []
    for image_id in ids:
        try:
            box, name = xywh_box(box_rows[image_id].split()), class_names[labels[image_id]]
            entries.append((root / "images" / paths[image_id], name, box))
        except (KeyError, ValueError) as err:
            raise ClipvizError(
                f"CUB root {root}: image {image_id} has no valid box, label or class ({err}); "
                "check bounding_boxes.txt, image_class_labels.txt and classes.txt"
            ) from err
    classes = [class_names[c] for c in sorted(class_names, key=_number)]
    return EvalDataset(_name(root, split), root, "cub", classes, entries, _decode_cub)


def _decode_cub(entry: tuple[Path, str, Box]) -> Sample:
    image_path, name, box = entry
    return Sample(image_path, _image_size(image_path), {}, {name: [box]}, None)


# --- generic folder -------------------------------------------------------------------


def _read_generic_boxes(path: Path) -> dict[str, dict[str, list[Box]]]:
    if not path.is_file():
        return {}
    data = _read_json(path)
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
    pixels, mode = _read_png(path)
    if pixels.ndim == 2:
        return pixels != 0
    if mode in ("RGBA", "LA"):
        return np.any(pixels[..., :-1], axis=-1) & (pixels[..., -1] > 0)
    return np.any(pixels, axis=-1)


def _open_generic(root: Path, split: str | None) -> EvalDataset:
    expected = "images/<stem>.<ext>, optional masks/<stem>/<class>.png and boxes.json"
    _require_dir(root, "generic", expected)
    if split not in (None, "all"):
        raise ClipvizError(f"generic dataset {root} has no splits; leave the split unset")
    if not (root / "images").is_dir():
        raise ClipvizError(f"generic root {root} has no images/ folder; expected {expected}")
    listing = (root / "images").iterdir()
    images = sorted(p for p in listing if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    box_table = _read_generic_boxes(root / "boxes.json")
    classes = {p.stem for p in (root / "masks").glob("*/*.png")}
    classes |= {name for per_class in box_table.values() for name in per_class}
    entries = [(p, box_table.get(p.name, box_table.get(p.stem, {}))) for p in images]
    decode = partial(_decode_generic, root)
    return EvalDataset(_name(root, split), root, "generic", sorted(classes), entries, decode)


def _decode_generic(root: Path, entry: tuple[Path, dict[str, list[Box]]]) -> Sample:
    image_path, listed_boxes = entry
    width, height = _image_size(image_path)
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


READERS: dict[str, Callable[[Path, str | None], EvalDataset]] = {
    "voc": _open_voc,
    "coco": _open_coco,
    "cub": _open_cub,
    "generic": _open_generic,
}
