"""Semantic segmentation benchmarks in their published layouts (as mmseg's dataset classes read them), for
`clipviz eval --task segment`: per image a photo and a label PNG of class indices.

Layouts (`format`; default split; label file beside each image; `reduce_zero_label`):

- voc: `JPEGImages/<id>.jpg`, `SegmentationClass/<id>.png`,
  `ImageSets/Segmentation/<split>.txt` (val); VOC21, or VOC20 with `reduce_zero_label`.
  A `classes.txt` at the root (one name per line, line 0 the background) names the labels.
- context: VOC2010's `JPEGImages/<id>.jpg`, `SegmentationClassContext/<id>.png`,
  `ImageSets/SegmentationContext/<split>.txt` (val); PC60, or PC59 with `reduce_zero_label`.
- coco-stuff: `images/<split>/<stem>.jpg`, `annotations/<split>/<stem>_labelTrainIds.png`
  (val2017); 171 classes, 255 unlabeled.
- coco-object: `images/<split>/<stem>.jpg`, `annotations/<split>/<stem>_instanceTrainIds.png`
  (val2017; written from COCO-Stuff's labels by `clipviz coco-object`); 81 classes, 0 the
  background.
- cityscapes: `leftImg8bit/<split>/<city>/<stem>_leftImg8bit.png`,
  `gtFine/<split>/<city>/<stem>_gtFine_labelTrainIds.png` (val); 19 classes, 255 ignored.
- ade: `images/<split>/<stem>.jpg`, `annotations/<split>/<stem>.png` (validation); 150
  classes, `reduce_zero_label` always (0, "other", is ignored).

Layouts without a split file list the images of the split's folder (recursively, sorted).
`reduce_zero_label` (mmseg's): label 0 becomes 255 (ignored), every other label goes down by
one. A missing image or label fails that image (`ClipvizError`, exit code 1), not the run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import overload

import numpy as np

from ...errors import ClipvizError
from .common import IMAGE_EXTENSIONS, dataset_name, missing_image, read_png, require_dir

SEGMENT_FORMATS = ("voc", "context", "coco-stuff", "coco-object", "cityscapes", "ade")
IGNORE = 255


@dataclass(frozen=True)
class SegLayout:
    """Where one benchmark keeps its images and labels.

    image_dir, label_dir: folders under the root, `{split}` replaced; split_file: the list of
    ids (None: every image under `image_dir`); image_suffix, label_suffix: what follows an
    image's stem in each file name; benchmark: the shipped class names (and, with
    `reduce_zero_label`, `zero_reduced`'s).
    """

    name: str
    image_dir: str
    label_dir: str
    split_file: str | None
    default_split: str
    image_suffix: str
    label_suffix: str
    benchmark: str
    reduce_zero_label: bool = False
    zero_reduced: str | None = None


LAYOUTS = {
    "voc": SegLayout("VOC", "JPEGImages", "SegmentationClass", "ImageSets/Segmentation/{split}.txt",
                     "val", ".jpg", ".png", "voc21", zero_reduced="voc20"),
    "context": SegLayout("Pascal Context", "JPEGImages", "SegmentationClassContext",
                         "ImageSets/SegmentationContext/{split}.txt", "val", ".jpg", ".png",
                         "context60", zero_reduced="context59"),
    "coco-stuff": SegLayout("COCO-Stuff", "images/{split}", "annotations/{split}", None,
                            "val2017", ".jpg", "_labelTrainIds.png", "coco_stuff164k"),
    "coco-object": SegLayout("COCO-Object", "images/{split}", "annotations/{split}", None,
                             "val2017", ".jpg", "_instanceTrainIds.png", "coco_object"),
    "cityscapes": SegLayout("Cityscapes", "leftImg8bit/{split}", "gtFine/{split}", None, "val",
                            "_leftImg8bit.png", "_gtFine_labelTrainIds.png", "cityscapes"),
    "ade": SegLayout("ADE20k", "images/{split}", "annotations/{split}", None, "validation",
                     ".jpg", ".png", "ade20k", reduce_zero_label=True, zero_reduced="ade20k"),
}  # fmt: skip


@dataclass(eq=False)
class SegDataset(Sequence[tuple[Path, Path]]):
    """The (image, label) files of one benchmark split; labels are read by `label`.

    class_names: the names `classes.txt` gives the labels (None: the benchmark's shipped
    ones); benchmark: the shipped class names that fit these labels.
    """

    name: str
    root: Path
    format: str
    split: str
    benchmark: str
    reduce_zero_label: bool
    entries: list[tuple[Path, Path]]
    class_names: list[str] | None = None

    def __len__(self) -> int:
        return len(self.entries)

    @overload
    def __getitem__(self, index: int) -> tuple[Path, Path]: ...

    @overload
    def __getitem__(self, index: slice) -> SegDataset: ...

    def __getitem__(self, index: int | slice) -> tuple[Path, Path] | SegDataset:
        if isinstance(index, slice):
            return replace(self, entries=self.entries[index])
        return self.entries[index]

    def entry_name(self, index: int) -> str:
        return str(self.entries[index][0])

    def label(self, index: int) -> np.ndarray:
        """Image `index`'s labels `[H, W]` (int64), `reduce_zero_label` applied: 255 ignored."""
        image, path = self.entries[index]
        if not image.is_file():
            raise missing_image(image)
        labels, mode = read_png(path)
        if labels.ndim != 2:
            raise ClipvizError(
                f"{path} is a {mode} image; expected a palette or grayscale PNG of class indices",
                exit_code=1,
            )
        labels = labels.astype(np.int64)
        if self.reduce_zero_label:
            reduced = labels - 1
            reduced[(labels == 0) | (labels == IGNORE)] = IGNORE
            return reduced
        return labels


def _ids_of_split(root: Path, layout: SegLayout, split: str) -> list[str]:
    assert layout.split_file is not None
    path = root / layout.split_file.format(split=split)
    if not path.is_file():
        available = sorted(p.stem for p in path.parent.glob("*.txt"))
        raise ClipvizError(
            f"{layout.name} split file {path} does not exist; choose another `split` "
            f"(available: {', '.join(available) or 'none'})"
        )
    text = path.read_text(encoding="utf-8")
    return [line.split()[0] for line in text.splitlines() if line.strip()]


def _listed_images(folder: Path, suffix: str) -> list[tuple[str, Path]]:
    """(stem, path) of every image under `folder` whose name ends in `suffix` (for `.jpg`,
    any image extension), the stem relative to `folder`, sorted."""
    found = []
    for path in sorted(folder.rglob("*")):
        name = path.name
        if suffix == ".jpg":
            if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file():
                found.append((str(path.relative_to(folder).with_suffix("")), path))
        elif name.endswith(suffix) and path.is_file():
            rel = path.relative_to(folder)
            found.append((str(rel.parent / name[: -len(suffix)]), path))
    return found


def _class_names(root: Path, layout: SegLayout, reduce: bool) -> list[str] | None:
    """Names from `<root>/classes.txt` (line 0 the background), for VOC-layout sets of
    one's own; None: the benchmark's shipped names."""
    path = root / "classes.txt"
    if layout is not LAYOUTS["voc"] or not path.is_file():
        return None
    names = [line.strip() for line in path.read_text(encoding="utf-8").strip().splitlines()]
    if len(names) < 2 or not all(names):
        raise ClipvizError(
            f"{path} needs one class name per line (line 0 the background) and no blank lines"
        )
    return names[1:] if reduce else names


def open_segmentation(
    root: str | Path,
    fmt: str,
    split: str | None = None,
    limit: int | None = None,
    reduce_zero_label: bool | None = None,
) -> SegDataset:
    """Open a segmentation benchmark in one of `SEGMENT_FORMATS`' layouts (module docstring).

    reduce_zero_label: None: the layout's rule (ADE on, the others off).
    """
    if fmt not in LAYOUTS:
        raise ClipvizError(
            f"format {fmt!r} is not a segmentation layout; choose from {', '.join(LAYOUTS)}"
        )
    layout = LAYOUTS[fmt]
    path = Path(root).expanduser()
    expected = f"{layout.image_dir}/ and {layout.label_dir}/".replace("{split}", "<split>")
    if not path.exists():
        raise ClipvizError(f"{layout.name} root {path} does not exist; check the path")
    require_dir(path, layout.name, expected)
    if limit is not None and limit < 0:
        raise ClipvizError(f"limit must be 0 or more, got {limit}")
    split = split or layout.default_split
    reduce = layout.reduce_zero_label if reduce_zero_label is None else reduce_zero_label
    benchmark = layout.zero_reduced if reduce and layout.zero_reduced else layout.benchmark
    if reduce and layout.zero_reduced is None:
        raise ClipvizError(
            f"{layout.name} has no background label to reduce; drop `reduce_zero_label`"
        )
    image_dir = path / layout.image_dir.format(split=split)
    label_dir = path / layout.label_dir.format(split=split)
    for folder in (image_dir, label_dir):
        if not folder.is_dir():
            raise ClipvizError(
                f"{layout.name} root {path} has no {folder.relative_to(path)}/ folder; expected "
                f"{expected} (is `split` {split} right?)"
            )
    if layout.split_file is not None:
        entries = []
        for stem in _ids_of_split(path, layout, split):
            image = image_dir / f"{stem}{layout.image_suffix}"
            if not image.is_file() and image.with_suffix(".png").is_file():
                image = image.with_suffix(".png")
            entries.append((image, label_dir / f"{stem}{layout.label_suffix}"))
    else:
        entries = [
            (image, label_dir / f"{stem}{layout.label_suffix}")
            for stem, image in _listed_images(image_dir, layout.image_suffix)
        ]
    dataset = SegDataset(
        dataset_name(path, split), path, fmt, split, benchmark, reduce, entries,
        _class_names(path, layout, reduce),
    )  # fmt: skip
    return dataset if limit is None else dataset[:limit]
