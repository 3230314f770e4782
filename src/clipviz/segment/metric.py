"""mmseg's `IoUMetric`: per-class intersection and union summed over a split, then IoU per
class, mIoU as the mean over the classes that are present or predicted, aAcc and mAcc.

Per image, pixels labelled `ignore_index` (255) are left out; a label outside 0 … K−1 adds
nothing to the label counts, but its pixel's prediction still counts. A class absent from
both the labels and the predictions of the whole split has no IoU (NaN) and is left out of
the means; one absent but predicted scores 0. Counts are exact integers (mmseg sums float32
histograms, which round once a class passes 2^24 pixels).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

IGNORE_INDEX = 255


def reduce_zero_label(label: np.ndarray) -> np.ndarray:
    """mmseg's `reduce_zero_label` on a uint8 label map: 0 (background) becomes 255 (ignored),
    every other label goes down by one, 255 stays 255 (VOC20, PC59, ADE20k)."""
    out = label.astype(np.int64) - 1
    out[(label == 0) | (label == IGNORE_INDEX)] = IGNORE_INDEX
    return out


def intersect_and_union(
    pred: np.ndarray, label: np.ndarray, num_classes: int, ignore_index: int = IGNORE_INDEX
) -> np.ndarray:
    """Per-class pixel counts of one image `[4, K]` (int64): intersection, union, prediction,
    label."""
    if pred.shape != label.shape:
        raise ValueError(f"prediction {pred.shape} and label {label.shape} differ in size")
    keep = label != ignore_index
    pred, label = pred[keep].astype(np.int64), label[keep].astype(np.int64)

    def histogram(values: np.ndarray) -> np.ndarray:
        inside = values[(values >= 0) & (values < num_classes)]
        return np.bincount(inside, minlength=num_classes)

    intersect = histogram(pred[pred == label])
    area_pred, area_label = histogram(pred), histogram(label)
    return np.stack([intersect, area_pred + area_label - intersect, area_pred, area_label])


@dataclass
class IoUMetric:
    """Counts over a split; `add` one image at a time, then read the scores."""

    num_classes: int
    ignore_index: int = IGNORE_INDEX
    totals: np.ndarray = field(init=False)  # [4, K]: intersection, union, prediction, label
    images: int = 0

    def __post_init__(self) -> None:
        self.totals = np.zeros((4, self.num_classes), dtype=np.int64)

    def add(self, pred: np.ndarray, label: np.ndarray) -> None:
        self.totals += intersect_and_union(pred, label, self.num_classes, self.ignore_index)
        self.images += 1

    @property
    def iou(self) -> np.ndarray:
        """IoU per class `[K]` (NaN where the union is empty)."""
        intersect, union = self.totals[0], self.totals[1]
        with np.errstate(divide="ignore", invalid="ignore"):
            return intersect / union

    @property
    def acc(self) -> np.ndarray:
        """Accuracy per class `[K]`: intersection over labelled pixels (NaN where none)."""
        with np.errstate(divide="ignore", invalid="ignore"):
            return self.totals[0] / self.totals[3]

    @property
    def aacc(self) -> float:
        """Correct pixels over labelled pixels."""
        labelled = self.totals[3].sum()
        return float(self.totals[0].sum() / labelled) if labelled else float("nan")

    @property
    def miou(self) -> float:
        return _nanmean(self.iou)

    @property
    def macc(self) -> float:
        return _nanmean(self.acc)

    def summary(self, class_names: list[str] | None = None) -> dict[str, Any]:
        """mIoU, aAcc, mAcc (×100, two decimals, as mmseg reports them) and IoU per class."""
        names = class_names or [str(c) for c in range(self.num_classes)]
        return {
            "mIoU": _percent(self.miou),
            "aAcc": _percent(self.aacc),
            "mAcc": _percent(self.macc),
            "IoU": {n: _percent(v) for n, v in zip(names, self.iou.tolist(), strict=True)},
            "images": self.images,
        }


def _nanmean(values: np.ndarray) -> float:
    present = values[~np.isnan(values)]
    return float(present.mean()) if present.size else float("nan")


def _percent(value: float) -> float | None:
    return None if np.isnan(value) else round(float(value) * 100, 2)
