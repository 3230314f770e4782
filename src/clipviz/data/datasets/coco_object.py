"""COCO-Object labels from COCO-Stuff-164k's raw label PNGs (the rule of the field's `cvt_coco_object.py`, after GroupViT and TCL).

A raw COCO-Stuff label is the COCO category id minus one (things 0 … 89 with ten ids unused,
stuff 91 … 181) or 255 (unlabeled). COCO-Object keeps the 80 things as classes 1 … 80 in id
order and makes everything else — stuff and unlabeled alike — class 0, the background; so
a COCO-Object label has no ignored pixel. Values that no category uses (the unused thing ids)
are left as they are, as the converter the benchmark's numbers come from leaves them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ...errors import ClipvizError
from ...files import atomic_path
from .common import read_png

# COCO category ids (1-based) that name no thing class
UNUSED_THING_IDS = frozenset({12, 26, 29, 30, 45, 66, 68, 69, 71, 83})
# raw label (id − 1) of each of the 80 things, in id order: class k + 1 is THING_LABELS[k]
THING_LABELS = tuple(i - 1 for i in range(1, 91) if i not in UNUSED_THING_IDS)
OUTPUT_SUFFIX = "_instanceTrainIds.png"


def coco_object_lookup() -> np.ndarray:
    """`[256]` uint8: the COCO-Object label of each raw COCO-Stuff label value."""
    table = np.arange(256, dtype=np.uint8)
    for k, raw in enumerate(THING_LABELS):
        table[raw] = k + 1
    table[91:] = 0  # stuff (91 … 181) and unlabeled (255): background
    return table


def coco_object_labels(raw: np.ndarray) -> np.ndarray:
    """The COCO-Object labels `[H, W]` (uint8) of a raw COCO-Stuff label map."""
    return coco_object_lookup()[raw.astype(np.uint8)]


@dataclass
class Conversion:
    """What a conversion did: files written, files already there (skipped), failures."""

    written: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)


def raw_stuff_labels(root: Path, split: str) -> list[Path]:
    """The raw label PNGs of `annotations/<split>/` (names without `TrainIds`), sorted."""
    folder = root / "annotations" / split
    if not folder.is_dir():
        raise ClipvizError(
            f"{folder} is not a folder; point at the COCO-Stuff root holding "
            f"annotations/{split}/ with its raw label PNGs"
        )
    return sorted(p for p in folder.glob("*.png") if "TrainIds" not in p.name)


def convert_coco_object(
    root: str | Path, splits: tuple[str, ...] = ("train2017", "val2017"), overwrite: bool = False
) -> Conversion:
    """Write `<stem>_instanceTrainIds.png` beside each raw label of COCO-Stuff's `splits`.

    A label that cannot be read is recorded as failed and the others go on; a file already
    written is kept unless `overwrite`.
    """
    root = Path(root).expanduser()
    sources = {split: raw_stuff_labels(root, split) for split in splits}
    if not any(sources.values()):
        raise ClipvizError(
            f"no raw COCO-Stuff label PNG under {root}/annotations/{{{','.join(splits)}}}/; "
            "unpack stuffthingmaps_trainval2017.zip there"
        )
    done = Conversion()
    for paths in sources.values():
        for path in paths:
            target = path.with_name(path.name.split(".")[0] + OUTPUT_SUFFIX)
            if target.exists() and not overwrite:
                done.skipped.append(target)
                continue
            try:
                raw, mode = read_png(path)
                if raw.ndim != 2 or raw.dtype != np.uint8:
                    raise ClipvizError(f"{path} is a {mode} image, not 8-bit labels", exit_code=1)
            except ClipvizError as e:
                done.failed.append((path, str(e)))
                continue
            with atomic_path(target) as tmp, open(tmp, "wb") as f:
                Image.fromarray(coco_object_labels(raw), mode="L").save(f, format="PNG")
            done.written.append(target)
    return done
