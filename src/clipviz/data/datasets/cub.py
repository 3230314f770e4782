"""CUB-200-2011 boxes layout (see `clipviz.data.datasets`)."""

from __future__ import annotations

from pathlib import Path

from ...errors import ClipvizError
from .common import Box, EvalDataset, Sample, dataset_name, image_size, require_dir, xywh_box


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
    require_dir(root, "CUB", expected)
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
    return EvalDataset(
        dataset_name(root, split), root, "cub", classes, entries, _decode_cub, has_masks=False
    )


def _decode_cub(entry: tuple[Path, str, Box]) -> Sample:
    image_path, name, box = entry
    return Sample(image_path, image_size(image_path), {}, {name: [box]}, None)
