"""Scoring open-vocabulary segmentation on a benchmark split, resumably (mmseg's IoUMetric: counts summed over the split).

Each image's per-class pixel counts (intersection, union, prediction, label) of every scored
row — a method, or a method with PAMR — go to a JSON-lines file as soon as the image is done;
the split's numbers are mmseg's `IoUMetric` over the sums of those counts, so a killed run
resumes where it stopped and the result is the same. Intervals: a percentile bootstrap over
images of the same sums.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..backend import Backend
from ..data.datasets.semseg import SegDataset
from ..data.images import DEFAULT_MAX_PIXELS, ImageError, load_image
from ..distributed import Dist, barrier
from ..errors import ClipvizError
from ..files import read_jsonl
from ..segment import ClassNames, IoUMetric, Protocol, Segmenter, intersect_and_union
from .eval_stats import CI_LEVEL, RESAMPLES, resample_draws
from .manifest import (
    append_record,
    merge_parts,
    methods_proxy_weights,
    part_path,
    repair_manifest,
)

SEGMENT_METRICS = ("miou", "aacc", "macc")


@dataclass(frozen=True)
class SegmentEvalOptions:
    """What is scored: each method under `protocol` (or its own in `protocols`), and with
    `pamr_compare` each also with PAMR (`pamr_steps` 10 when the protocol has none) as the
    row `<method>+pamr`."""

    methods: tuple[str, ...] = ("sclip",)
    protocol: Protocol = Protocol()
    method_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    pamr_compare: bool = False
    batch_size: int = 8
    max_pixels: int = DEFAULT_MAX_PIXELS
    protocols: dict[str, Protocol] = field(default_factory=dict)  # by method

    def protocol_of(self, method: str) -> Protocol:
        return self.protocols.get(method, self.protocol)

    def rows(self) -> list[tuple[str, str, Protocol]]:
        """(row name, method, protocol) of every scored row, in order."""
        out = []
        for m in self.methods:
            protocol = self.protocol_of(m)
            if self.pamr_compare:
                plain = dataclasses.replace(protocol, pamr_steps=0)
                steps = protocol.pamr_steps or 10
                out += [
                    (m, m, plain),
                    (f"{m}+pamr", m, dataclasses.replace(plain, pamr_steps=steps)),
                ]
            else:
                out.append((m, m, protocol))
        return out


def protocol_json(protocol: Protocol) -> dict[str, Any]:
    return {**dataclasses.asdict(protocol), "pamr_dilations": list(protocol.pamr_dilations)}


def request_key(
    backend: Backend, dataset: SegDataset, classes: ClassNames, opts: SegmentEvalOptions
) -> str:
    request = {
        "model": backend.content_identity,
        "dataset": [str(dataset.root), dataset.format, dataset.name, dataset.reduce_zero_label],
        "classes": [list(line) for line in classes.lines],
        "rows": [(name, m, protocol_json(p)) for name, m, p in opts.rows()],
        "options": opts.method_options,
    }
    stamps = methods_proxy_weights(opts.method_options)
    if stamps:  # absent otherwise: earlier keys still hold
        request["proxy_weights"] = stamps
    blob = json.dumps(request, sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def evaluate_segmentation(
    backend: Backend,
    dataset: SegDataset,
    classes: ClassNames,
    opts: SegmentEvalOptions,
    records_path: Path,
    on_image: Callable[[dict[str, Any]], None] | None = None,
    dist: Dist = Dist(),
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Segment every image of `dataset` into `classes` with every row of `opts`; returns
    (results per row, all image records).

    Images already recorded for the same request are not segmented again. In a torchrun job
    rank r segments images r, r + world, … into its own part of the records, which rank 0
    merges and reduces (the other ranks return no results).
    """
    if opts.batch_size < 1:
        raise ClipvizError(f"`batch_size` {opts.batch_size} must be at least 1")
    for m in opts.methods:
        opts.protocol_of(m).check()
    rows = opts.rows()
    segmenters = {
        m: Segmenter(backend, classes, m, opts.protocol_of(m), opts.method_options.get(m))
        for m in opts.methods
    }
    key = request_key(backend, dataset, classes, opts)
    records_path.parent.mkdir(parents=True, exist_ok=True)
    if dist.main:
        repair_manifest(records_path)
        merge_parts(records_path)
    barrier(dist)
    own = records_path if dist.world == 1 else part_path(records_path, dist.rank)
    records = list(
        {
            r["index"]: r
            for r in read_jsonl(records_path)
            if r.get("key") == key and r.get("status") == "ok"
        }.values()
    )
    done = {r["index"] for r in records}
    failed: list[dict[str, Any]] = []

    def emit(rec: dict[str, Any]) -> None:
        rec["key"] = key
        append_record(own, rec)
        (records if rec["status"] == "ok" else failed).append(rec)
        if on_image:
            on_image(rec)

    todo = [i for i in range(dist.rank, len(dataset), dist.world) if i not in done]
    for start in range(0, len(todo), opts.batch_size):
        batch: list[tuple[int, np.ndarray, np.ndarray]] = []  # index, image, labels
        for i in todo[start : start + opts.batch_size]:
            try:
                image_path, label_path = dataset[i]
                picture = np.asarray(load_image(image_path, opts.max_pixels))
                labels = dataset.label(i)
                if labels.shape != picture.shape[:2]:
                    raise ClipvizError(
                        f"image is {picture.shape[1]}x{picture.shape[0]} but its labels "
                        f"{label_path.name} are {labels.shape[1]}x{labels.shape[0]}; the label PNG "
                        "must have the image's size",
                        exit_code=1,
                    )
            except (ClipvizError, ImageError) as e:
                if isinstance(e, ClipvizError) and e.exit_code != 1:
                    raise
                emit({"index": i, "image": dataset.entry_name(i), "status": "failed",
                      "error": str(e)})  # fmt: skip
                continue
            batch.append((i, picture, labels))
        if not batch:
            continue
        t0 = time.perf_counter()
        counts: list[dict[str, list[list[int]]]] = [{} for _ in batch]
        errors: list[str | None] = [None] * len(batch)
        for method, segmenter in segmenters.items():
            prepared: list[Any] = []
            for j, (_, picture, _) in enumerate(batch):
                try:
                    prepared.append(segmenter.prepare(picture))
                except ClipvizError as e:
                    if e.exit_code != 1:
                        raise
                    prepared.append(None)
                    errors[j] = errors[j] or str(e)
            maps, too_small = segmenter.window_maps(prepared)
            for name, m, protocol in rows:
                if m != method:
                    continue
                variant = copy.copy(segmenter)
                variant.protocol = protocol
                for j, p in enumerate(prepared):
                    if errors[j] is not None or p is None:
                        continue
                    if j in too_small:
                        errors[j] = f"{method}: {too_small[j]}"
                        continue
                    result = variant.segment_one(
                        p, [maps[(j, w)] for w in range(len(p.windows))], keep_probs=False
                    )
                    if result.labels is None:
                        errors[j] = f"{name}: {result.error}"
                        continue
                    table = intersect_and_union(result.labels, batch[j][2], len(classes))
                    counts[j][name] = table.tolist()
        seconds = (time.perf_counter() - t0) / len(batch)
        for j, (i, _, _) in enumerate(batch):
            if errors[j] is not None:
                emit({"index": i, "image": dataset.entry_name(i), "status": "failed",
                      "error": errors[j]})  # fmt: skip
            else:
                emit({"index": i, "image": dataset.entry_name(i), "status": "ok",
                      "seconds": round(seconds, 4), "counts": counts[j]})  # fmt: skip
    if dist.world > 1:
        barrier(dist)
        if not dist.main:
            return {}, records + failed
        merge_parts(records_path)
        latest = {r["index"]: r for r in read_jsonl(records_path) if r.get("key") == key}
        records = [r for r in latest.values() if r["status"] == "ok"]
        failed = [r for r in latest.values() if r["status"] != "ok"]
    records.sort(key=lambda r: r["index"])
    return reduce_segment_records(records, [r[0] for r in rows], classes.labels), records + failed


def reduce_segment_records(
    records: Sequence[dict[str, Any]],
    rows: Sequence[str],
    class_labels: Sequence[str],
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> dict[str, Any]:
    """Per row: mIoU, aAcc, mAcc (%, two decimals), IoU per class, the images scored, and
    each metric's 95 % interval (`<metric>_ci`, bootstrap over images)."""
    results: dict[str, Any] = {}
    for row in rows:
        tables = np.array([r["counts"][row] for r in records if row in r.get("counts", {})])
        metric = IoUMetric(len(class_labels))
        if len(tables):
            metric.totals = tables.sum(axis=0).astype(np.int64)
            metric.images = len(tables)
        summary = metric.summary(list(class_labels))
        out: dict[str, Any] = {
            "images": summary["images"],
            "miou": summary["mIoU"],
            "aacc": summary["aAcc"],
            "macc": summary["mAcc"],
            "miou_per_class": summary["IoU"],
        }
        for name, ci in segment_intervals(tables, resamples, seed).items():
            out[f"{name}_ci"] = ci
        results[row] = out
    return results


def segment_distribution(
    tables: np.ndarray, resamples: int = RESAMPLES, seed: int = 0
) -> dict[str, np.ndarray]:
    """mIoU, aAcc, mAcc (%) on each bootstrap resample of the images `[resamples]`, from the
    images' count tables `tables` `[N, 4, K]` (each resample sums its drawn images' tables)."""
    if len(tables) == 0:
        return {}
    draws = resample_draws(len(tables), resamples, seed)
    weights = np.zeros((resamples, len(tables)))
    np.add.at(weights, (np.repeat(np.arange(resamples), len(tables)), draws.ravel()), 1.0)
    sums = np.einsum("rn,nak->rak", weights, tables.astype(float))  # [R, 4, K]
    inter, union, label = sums[:, 0], sums[:, 1], sums[:, 3]
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, inter / union, np.nan)
        acc = np.where(label > 0, inter / label, np.nan)
        aacc = inter.sum(axis=1) / label.sum(axis=1)
    return {
        "miou": _nanmean_rows(iou) * 100,
        "aacc": aacc * 100,
        "macc": _nanmean_rows(acc) * 100,
    }


def segment_intervals(
    tables: np.ndarray, resamples: int = RESAMPLES, seed: int = 0
) -> dict[str, list[float] | None]:
    """95 % percentile intervals of `segment_distribution`."""
    out: dict[str, list[float] | None] = {}
    for name, values in segment_distribution(tables, resamples, seed).items():
        finite = values[np.isfinite(values)]
        if finite.size == 0:
            out[name] = None
            continue
        tail = (1.0 - CI_LEVEL) / 2 * 100
        lo, hi = np.percentile(finite, [tail, 100 - tail])
        out[name] = [round(float(lo), 2), round(float(hi), 2)]
    return out


def _nanmean_rows(values: np.ndarray) -> np.ndarray:
    present = ~np.isnan(values)
    count = present.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, np.nansum(values, axis=1) / count, np.nan)
