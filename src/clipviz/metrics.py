"""Saliency-map metrics: mIoU, mSC, pointing games, MaxBoxAcc, deletion / insertion AUC.

Every metric takes a map `[H, W]` at the ground truth's resolution (the caller upsamples) and
min-max normalises it to [0, 1] itself first; a constant map becomes all zeros.
Boxes are `(x0, y0, x1, y1)` in pixels, inclusive-exclusive: a box covering columns 3..7
has `x0 = 3, x1 = 8`, and its area is `(x1 - x0) * (y1 - y0)`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Literal, NamedTuple

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F

from .errors import ClipvizError
from .maps import normalize_map

Box = tuple[float, float, float, float]

MIOU_THRESHOLDS: np.ndarray = np.round(np.arange(1, 20) * 0.05, 2)  # 0.05, 0.10, …, 0.95
BOX_THRESHOLDS: np.ndarray = np.arange(100) / 100  # 0.00, 0.01, …, 0.99


def _map_and_mask(saliency: npt.ArrayLike, mask: npt.ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    s, m = normalize_map(saliency), np.asarray(mask, dtype=bool)
    if s.ndim != 2 or s.shape != m.shape:
        raise ClipvizError(
            f"map {s.shape} and mask {m.shape} must both be [H, W] of the same size; "
            "upsample the map to the ground truth's resolution first"
        )
    return s, m


# --- mIoU -------------------------------------------------------------------------------


def iou_counts(
    saliency: npt.ArrayLike,
    mask: npt.ArrayLike,
    valid: npt.ArrayLike | None = None,
    thresholds: npt.ArrayLike = MIOU_THRESHOLDS,
    class_name: str = "",
) -> tuple[np.ndarray, np.ndarray]:
    """Intersection and union pixel counts of `map >= τ` with `mask`, for every τ at once.

    The map is normalised over the whole image, ignored pixels (`valid` False) included,
    and those pixels are then left out of both counts.
    """
    s, m = _map_and_mask(saliency, mask)
    if valid is not None:
        keep = np.asarray(valid, dtype=bool)
        s, m = s[keep], m[keep]
    fg, bg = np.sort(s[m]), np.sort(s[~m])
    if fg.size == 0:
        raise ClipvizError(
            f"class {class_name!r} has no valid mask pixels; pass only classes present in the image"
        )
    taus = np.asarray(thresholds, dtype=np.float64)
    # count(s >= τ) for every τ at once, from sorted values instead of a [τ, H*W] stack
    fg_on = fg.size - np.searchsorted(fg, taus, side="left")
    bg_on = bg.size - np.searchsorted(bg, taus, side="left")
    return fg_on.astype(np.int64), (fg.size + bg_on).astype(np.int64)


class MIoUResult(NamedTuple):
    """Best mIoU over the threshold grid, its threshold, per-class IoU there, whole curve."""

    miou: float
    threshold: float
    per_class: dict[str, float]
    curve: np.ndarray  # [len(thresholds)] mIoU at each threshold


class MIoU:
    """Accumulates per-class intersection and union over a dataset for every threshold."""

    def __init__(self, thresholds: npt.ArrayLike = MIOU_THRESHOLDS) -> None:
        self.thresholds = np.asarray(thresholds, dtype=np.float64)
        self._intersection: dict[str, np.ndarray] = {}
        self._union: dict[str, np.ndarray] = {}

    def update(
        self,
        saliency: npt.ArrayLike,
        mask: npt.ArrayLike,
        class_name: str,
        valid: npt.ArrayLike | None = None,
    ) -> None:
        """Add one (image, present class) pair; `valid` False marks ignored pixels (VOC 255)."""
        self.add(class_name, *iou_counts(saliency, mask, valid, self.thresholds, class_name))

    def add(self, class_name: str, intersection: np.ndarray, union: np.ndarray) -> None:
        """Add counts computed by `iou_counts` (e.g. stored per image by a resumable run)."""
        zero = np.zeros(self.thresholds.size, dtype=np.int64)
        self._intersection[class_name] = self._intersection.get(class_name, zero) + intersection
        self._union[class_name] = self._union.get(class_name, zero) + union

    def result(self) -> MIoUResult:
        """mIoU per threshold = mean over classes of sum(I) / sum(U); ties pick the lowest τ."""
        if not self._union:
            raise ClipvizError("mIoU has no samples; call update() at least once")
        names = sorted(self._union)
        iou = np.stack([self._intersection[n] / self._union[n] for n in names])  # [C, τ]
        curve = iou.mean(axis=0)
        best = int(np.argmax(curve))
        per_class = {n: float(iou[i, best]) for i, n in enumerate(names)}
        return MIoUResult(float(curve[best]), float(self.thresholds[best]), per_class, curve)


# --- score contrast and pointing ---------------------------------------------------------


def score_contrast(
    saliency: npt.ArrayLike, mask: npt.ArrayLike, valid: npt.ArrayLike | None = None
) -> float:
    """(mean of the map on the mask - mean off it) * 100, after normalisation.

    Returns nan when the foreground or the background is empty (callers skip nan);
    `valid` False excludes pixels from both means.
    """
    s, m = _map_and_mask(saliency, mask)
    keep = np.ones_like(m) if valid is None else np.asarray(valid, dtype=bool)
    fg, bg = s[m & keep], s[~m & keep]
    if fg.size == 0 or bg.size == 0:
        return math.nan
    return float((fg.mean() - bg.mean()) * 100.0)


def mean_score_contrast(contrasts: Iterable[float]) -> float:
    """mSC: the mean of `score_contrast` over (image, class) pairs, nan ones skipped."""
    values = np.asarray([c for c in contrasts if not math.isnan(c)], dtype=np.float64)
    return float(values.mean()) if values.size else math.nan


def pointing_hit(saliency: npt.ArrayLike, mask: npt.ArrayLike, tolerance_px: float = 15) -> bool:
    """True if the map's maximum lies within `tolerance_px` (Euclidean) of a mask pixel.

    Ties for the maximum go to the first pixel in raster order (so a constant map points at
    the top-left corner). Tolerance 0 means the maximum must be on the mask.
    """
    s, m = _map_and_mask(saliency, mask)
    if tolerance_px < 0:
        raise ClipvizError(f"pointing tolerance must be >= 0 px, got {tolerance_px}")
    if not m.any():
        raise ClipvizError(
            "pointing game needs a non-empty mask; skip classes absent from the image"
        )
    y, x = np.unravel_index(int(np.argmax(s)), s.shape)
    ys, xs = np.nonzero(m)
    # integer squared distances: exact, no rounding at the tolerance boundary
    return bool(((ys - y) ** 2 + (xs - x) ** 2).min() <= tolerance_px**2)


def energy_pointing(saliency: npt.ArrayLike, mask: npt.ArrayLike) -> float:
    """Share of the normalised map's mass that falls on the mask.

    A constant map (all zeros after normalisation) counts as spreading its mass evenly, so it
    scores the mask's area share.
    """
    s, m = _map_and_mask(saliency, mask)
    total = s.sum()
    if total == 0:
        return float(m.mean())
    return float(s[m].sum() / total)


# --- MaxBoxAcc ----------------------------------------------------------------------------


def box_iou(a: Box, b: Box) -> float:
    """IoU of two inclusive-exclusive boxes `(x0, y0, x1, y1)`."""
    iw = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _component_roots(n: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Connected components of a graph on n nodes with edges (u, v): smallest node id each."""
    parent = np.arange(n)
    while True:
        while True:  # pointer jumping until every node points at its root
            grand = parent[parent]
            if np.array_equal(grand, parent):
                break
            parent = grand
        ru, rv = parent[u], parent[v]
        differ = ru != rv
        if not differ.any():
            return parent
        # hook the larger root under the smaller; parent[i] <= i always, so no cycles
        np.minimum.at(
            parent, np.maximum(ru[differ], rv[differ]), np.minimum(ru[differ], rv[differ])
        )


def largest_component_box(binary: npt.ArrayLike) -> Box | None:
    """Box of the largest 4-connected component of a boolean map, None if it is empty.

    Works on horizontal runs of pixels rather than pixels, which keeps it vectorised.
    Ties in size go to the component whose first pixel comes first in raster order.
    """
    b = np.asarray(binary, dtype=bool)
    h, w = b.shape
    padded = np.zeros((h, w + 2), dtype=np.int8)
    padded[:, 1:-1] = b
    edges = np.diff(padded, axis=1)  # +1 at a run's first column, -1 just past its last
    rows, starts = np.nonzero(edges == 1)
    stops = np.nonzero(edges == -1)[1]
    if rows.size == 0:
        return None
    # runs on consecutive rows touch iff their column intervals overlap
    stride = w + 1
    key_start, key_stop = rows * stride + starts, rows * stride + stops
    below = (rows + 1) * stride
    lo = np.searchsorted(key_stop, below + starts, side="right")
    hi = np.searchsorted(key_start, below + stops, side="left")
    counts = np.clip(hi - lo, 0, None)
    u = np.repeat(np.arange(rows.size), counts)
    v = (
        np.repeat(lo, counts)
        + np.arange(counts.sum())
        - np.repeat(np.cumsum(counts) - counts, counts)
    )
    roots = _component_roots(rows.size, u, v)
    sizes = np.bincount(roots, weights=stops - starts, minlength=rows.size)
    members = roots == int(np.argmax(sizes))
    return (
        int(starts[members].min()),
        int(rows[members].min()),
        int(stops[members].max()),
        int(rows[members].max()) + 1,
    )


def box_correct(
    saliency: npt.ArrayLike, gt_boxes: Sequence[Box], thresholds: npt.ArrayLike = BOX_THRESHOLDS
) -> np.ndarray:
    """Per threshold: does the largest component's box have IoU > 0.5 with any gt box.

    An empty binarisation counts as incorrect.
    """
    s = normalize_map(saliency)
    if not gt_boxes:
        raise ClipvizError("MaxBoxAcc needs at least one ground-truth box per image")
    for g in gt_boxes:
        if len(g) != 4 or g[2] <= g[0] or g[3] <= g[1]:
            raise ClipvizError(f"box {g} is not (x0, y0, x1, y1) with x1 > x0 and y1 > y0")
    taus = np.asarray(thresholds, dtype=np.float64)
    correct = np.zeros(taus.size, dtype=bool)
    for i, tau in enumerate(taus):
        box = largest_component_box(s >= tau)
        correct[i] = box is not None and any(box_iou(box, g) > 0.5 for g in gt_boxes)
    return correct


class MaxBoxAccResult(NamedTuple):
    """Best box accuracy over thresholds, its threshold, and accuracy per threshold."""

    max_box_acc: float
    threshold: float
    curve: np.ndarray  # [len(thresholds)]


class MaxBoxAcc:
    """Accumulates box accuracy per threshold over a dataset (WSOL's MaxBoxAcc)."""

    def __init__(self, thresholds: npt.ArrayLike = BOX_THRESHOLDS) -> None:
        self.thresholds = np.asarray(thresholds, dtype=np.float64)
        self._correct = np.zeros(self.thresholds.size, dtype=np.int64)
        self._count = 0

    def update(self, saliency: npt.ArrayLike, gt_boxes: Sequence[Box]) -> None:
        """Add one image with its ground-truth boxes (inclusive-exclusive pixels)."""
        self.add(box_correct(saliency, gt_boxes, self.thresholds))

    def add(self, correct: np.ndarray) -> None:
        """Add one image's per-threshold correctness computed by `box_correct`."""
        self._correct += np.asarray(correct, dtype=bool)
        self._count += 1

    def result(self) -> MaxBoxAccResult:
        """Max over thresholds of the share correct; ties pick the lowest threshold."""
        if self._count == 0:
            raise ClipvizError("MaxBoxAcc has no samples; call update() at least once")
        curve = self._correct / self._count
        best = int(np.argmax(curve))
        return MaxBoxAccResult(float(curve[best]), float(self.thresholds[best]), curve)


# --- deletion / insertion ------------------------------------------------------------------


class CurveResult(NamedTuple):
    """Area under a perturbation curve, with the curve itself."""

    auc: float
    fractions: np.ndarray  # [K] share of pixels deleted / inserted
    scores: np.ndarray  # [K] similarity relative to the unperturbed image


def gaussian_blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of a `[C, H, W]` image with reflect padding (radius 3σ)."""
    if sigma <= 0:
        raise ClipvizError(f"blur sigma must be > 0, got {sigma}")
    _, h, w = image.shape
    # reflect padding needs the radius below each side's length
    radius = max(1, min(math.ceil(3 * sigma), h - 1, w - 1))
    x = torch.arange(-radius, radius + 1, dtype=image.dtype, device=image.device)
    k = torch.exp(-(x**2) / (2 * sigma**2))
    k = k / k.sum()
    c = image.shape[0]
    out = F.pad(image[None], (radius, radius, radius, radius), mode="reflect")
    out = F.conv2d(out, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    out = F.conv2d(out, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    return out[0]


def _baseline(image: torch.Tensor, kind: str, blur_sigma: float) -> torch.Tensor:
    if kind == "blur":
        return gaussian_blur(image, blur_sigma)
    if kind == "zero":
        return torch.zeros_like(image)
    if kind == "mean":
        return image.mean(dim=(1, 2), keepdim=True).expand_as(image)
    raise ClipvizError(f"unknown baseline {kind!r}; use 'blur', 'zero' or 'mean'")


def trapezoid_auc(x: np.ndarray, y: np.ndarray) -> float:
    """Area under y(x) by the trapezoid rule."""
    return float(np.sum((y[1:] + y[:-1]) * np.diff(x)) / 2)


def deletion_insertion_curve(
    image: torch.Tensor,
    saliency: torch.Tensor | np.ndarray,
    similarity: Callable[[torch.Tensor], torch.Tensor],
    mode: Literal["deletion", "insertion"] = "deletion",
    step: float = 0.05,
    baseline: Literal["blur", "zero", "mean"] = "blur",
    blur_sigma: float = 5.0,
    batch_size: int | None = None,
) -> CurveResult:
    """Deletion / insertion curve of a CLIP similarity and its AUC over fractions in [0, 1].

    image: `[3, H, W]`, the model's input; saliency: `[H, W]` on the same grid.
    similarity: maps `[K, 3, H, W]` to `[K]` (e.g. cosine with one text); run under no_grad.
    Deletion replaces the most salient pixels by the baseline image, insertion reveals them
    onto it; pixels are ranked by decreasing saliency, ties in raster order (stable sort).
    Scores are divided by the unperturbed image's similarity, which is the curve's own
    endpoint (fraction 0 for deletion, 1 for insertion), so no extra forward pass; if that
    similarity is 0 the curve is undefined and scores and AUC are nan.
    batch_size: images per `similarity` call (default: all in one batch).
    """
    if mode not in ("deletion", "insertion"):
        raise ClipvizError(f"unknown mode {mode!r}; use 'deletion' or 'insertion'")
    sal = torch.as_tensor(np.asarray(torch.as_tensor(saliency).detach().cpu(), dtype=np.float64))
    if image.ndim != 3 or sal.shape != image.shape[1:]:
        raise ClipvizError(
            f"image {tuple(image.shape)} must be [3, H, W] and saliency [H, W] of the same H, W; got saliency {tuple(sal.shape)}"
        )
    n_steps = round(1 / step) if step > 0 else 0
    if n_steps < 1 or abs(n_steps * step - 1) > 1e-6:
        raise ClipvizError(f"step must divide 1 evenly (e.g. 0.05), got {step}")
    fractions = np.linspace(0.0, 1.0, n_steps + 1)
    h, w = sal.shape
    order = torch.argsort(sal.flatten(), descending=True, stable=True)
    rank = torch.empty(h * w, dtype=torch.long)
    rank[order] = torch.arange(h * w)
    rank = rank.view(1, 1, h, w).to(image.device)
    counts = torch.as_tensor(np.rint(fractions * h * w).astype(np.int64), device=image.device)
    base = _baseline(image, baseline, blur_sigma)
    first, second = (base, image) if mode == "deletion" else (image, base)
    scores: list[torch.Tensor] = []
    chunk = batch_size or len(fractions)
    with torch.no_grad():
        for i in range(0, len(fractions), chunk):
            chosen = rank < counts[i : i + chunk].view(-1, 1, 1, 1)  # [k, 1, H, W]
            out = similarity(torch.where(chosen, first, second))
            if out.shape != (chosen.shape[0],):
                raise ClipvizError(
                    f"similarity must return [K] for K images, got {tuple(out.shape)}"
                )
            scores.append(out.detach().float().cpu())
    raw = torch.cat(scores).numpy().astype(np.float64)
    reference = raw[0] if mode == "deletion" else raw[-1]
    if reference == 0:
        curve = np.full_like(raw, np.nan)
        return CurveResult(math.nan, fractions, curve)
    curve = raw / reference
    return CurveResult(trapezoid_auc(fractions, curve), fractions, curve)
