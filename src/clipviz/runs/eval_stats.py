"""Confidence intervals for the evaluation's numbers: a percentile bootstrap over images.

Each resample draws the scored images with replacement and recomputes every metric from the
drawn images' pair records exactly as the dataset-level reduction does — mIoU's per-class
sums and its threshold search, MaxBoxAcc's per-threshold share and its maximum, means for the
others — so an interval covers the whole procedure, threshold choice included.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..metrics import BOX_THRESHOLDS, MIOU_THRESHOLDS

CI_LEVEL = 0.95
RESAMPLES = 1000


def _interval(values: np.ndarray) -> list[float] | None:
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return None
    tail = (1.0 - CI_LEVEL) / 2 * 100
    lo, hi = np.percentile(finite, [tail, 100 - tail])
    return [float(lo), float(hi)]


def _weighted_mean(weights: np.ndarray, sums: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Per resample (`weights` `[R, N]` image counts): Σ w·sum / Σ w·count, NaN when empty."""
    total = weights @ counts
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, (weights @ sums) / total, np.nan)


def scored_images(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records the bootstrap resamples: scored images with at least one pair."""
    return [r for r in records if r.get("status") == "ok" and r.get("pairs")]


def resample_draws(images: int, resamples: int = RESAMPLES, seed: int = 0) -> np.ndarray:
    """`[resamples, images]` indices of the images drawn, with replacement."""
    return np.random.default_rng(seed).integers(0, images, (resamples, images))


def bootstrap_intervals(
    records: Sequence[dict[str, Any]],
    methods: Sequence[str],
    metrics: Sequence[str],
    resamples: int = RESAMPLES,
    seed: int = 0,
    fixed: dict[str, dict[str, float]] | None = None,
) -> dict[str, dict[str, list[float] | None]]:
    """Per method, `{metric: [low, high]}` 95 % intervals (mIoU, mSC, MaxBoxAcc in %).

    fixed: per method, thresholds chosen elsewhere: read there, not searched per resample.
    """
    dist = bootstrap_distribution(records, methods, metrics, resamples, seed, fixed)
    return {m: {k: _interval(v) for k, v in d.items()} for m, d in dist.items()}


def bootstrap_distribution(
    records: Sequence[dict[str, Any]],
    methods: Sequence[str],
    metrics: Sequence[str],
    resamples: int = RESAMPLES,
    seed: int = 0,
    fixed: dict[str, dict[str, float]] | None = None,
) -> dict[str, dict[str, np.ndarray]]:
    """Per method and metric, the metric on each resample `[resamples]`."""
    fixed = fixed or {}
    images = scored_images(records)
    if not images:
        return {m: {} for m in methods}
    draws = resample_draws(len(images), resamples, seed)
    weights = np.zeros((resamples, len(images)))
    np.add.at(weights, (np.repeat(np.arange(resamples), len(images)), draws.ravel()), 1.0)
    out: dict[str, dict[str, np.ndarray]] = {}
    for method in methods:
        per_image = [[p for p in r["pairs"] if p["method"] == method] for r in images]
        res: dict[str, np.ndarray] = {}
        for name, scale in (("msc", 1.0), ("pointing", 1.0), ("energy", 1.0),
                            ("deletion", 1.0), ("insertion", 1.0)):  # fmt: skip
            if name not in metrics:
                continue
            sums = np.array([sum(p[name] for p in ps if not _nan(p.get(name))) for ps in per_image])
            counts = np.array([sum(not _nan(p.get(name)) for p in ps) for ps in per_image])
            res[name] = scale * _weighted_mean(weights, sums, counts)
        if "miou" in metrics:
            curve = _miou_curves(weights, per_image)  # [R, τ]
            at = threshold_index(MIOU_THRESHOLDS, fixed.get(method, {}).get("miou"))
            res["miou"] = curve.max(axis=1) if at is None else curve[:, at]
        if "maxboxacc" in metrics:
            correct = np.array([np.sum([[c == "1" for c in p["box"]] for p in ps], axis=0)
                                if ps else np.zeros(100) for ps in per_image], dtype=float)  # fmt: skip
            counts = np.array([len(ps) for ps in per_image], dtype=float)
            with np.errstate(invalid="ignore", divide="ignore"):
                curve = (weights @ correct) / (weights @ counts)[:, None]  # [R, τ]
            at = threshold_index(BOX_THRESHOLDS, fixed.get(method, {}).get("maxboxacc"))
            res["maxboxacc"] = (curve.max(axis=1) if at is None else curve[:, at]) * 100
        out[method] = res
    return out


def _nan(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def threshold_index(grid: np.ndarray, tau: float | None) -> int | None:
    """The position of a fixed threshold on its grid (None: search the grid)."""
    return None if tau is None else int(np.argmin(np.abs(grid - tau)))


def _miou_curves(weights: np.ndarray, per_image: list[list[dict[str, Any]]]) -> np.ndarray:
    """mIoU (%) per resample and threshold `[R, τ]`: per class the weighted sums of I and U,
    IoU, the mean over the classes present in the resample."""
    classes = sorted({p["class"] for ps in per_image for p in ps})
    index = {c: k for k, c in enumerate(classes)}
    steps = len(next(p["iou_i"] for ps in per_image for p in ps))
    inter = np.zeros((len(per_image), len(classes), steps))
    union = np.zeros_like(inter)
    for i, ps in enumerate(per_image):
        for p in ps:
            inter[i, index[p["class"]]] += p["iou_i"]
            union[i, index[p["class"]]] += p["iou_u"]
    I = np.einsum("rn,nct->rct", weights, inter)  # noqa: E741
    U = np.einsum("rn,nct->rct", weights, union)
    present = (weights @ (union.sum(axis=2) > 0)) > 0  # [R, C]
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(U > 0, I / U, 0.0)
    curve = (iou * present[..., None]).sum(axis=1) / np.maximum(present.sum(axis=1), 1)[:, None]
    return curve * 100
