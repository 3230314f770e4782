"""Dataset-level numbers from the per-image records of an evaluation, and the files they go
to: the results JSON and a per-image CSV beside it."""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..backend import Backend, Texts
from ..data.datasets import EvalDataset
from ..files import atomic_path, provenance, write_json_atomic
from ..metrics import BOX_THRESHOLDS, MIOU_THRESHOLDS, MaxBoxAcc, MIoU, mean_score_contrast
from .eval_stats import CI_LEVEL, RESAMPLES, bootstrap_intervals, threshold_index

if TYPE_CHECKING:
    from ..data.datasets.semseg import SegDataset
    from ..segment import ClassNames
    from .evaluate import EvalOptions
    from .segment_eval import SegmentEvalOptions


def reduce_records(
    records: Sequence[dict[str, Any]],
    opts: EvalOptions,
    fixed: dict[str, dict[str, float]] | None = None,
) -> dict[str, Any]:
    """Dataset-level numbers per method from the per-pair records.

    fixed: per method, thresholds chosen elsewhere (`{"miou": τ, "maxboxacc": τ}`, e.g. on a
        tuning split): those metrics are read at τ instead of at the best τ of these records.
    """
    fixed = fixed or {}
    results: dict[str, Any] = {}
    for method in opts.methods:
        pairs = [p for r in records for p in r.get("pairs", []) if p["method"] == method]
        out: dict[str, Any] = {"pairs": len(pairs)}
        if not pairs:
            results[method] = out
            continue
        out["area"] = float(np.mean([p["area"] for p in pairs]))
        if "miou" in opts.metrics:
            miou = MIoU()
            for p in pairs:
                miou.add(p["class"], np.array(p["iou_i"]), np.array(p["iou_u"]))
            res = miou.result()
            at = threshold_index(MIOU_THRESHOLDS, fixed.get(method, {}).get("miou"))
            out["miou"] = (res.miou if at is None else float(res.curve[at])) * 100
            out["miou_threshold"] = res.threshold if at is None else float(MIOU_THRESHOLDS[at])
            out["miou_curve"] = [round(float(v) * 100, 4) for v in res.curve]  # per τ
            out["miou_per_class"] = {k: v * 100 for k, v in res.per_class.items()}
        if "msc" in opts.metrics:
            out["msc"] = mean_score_contrast(p["msc"] for p in pairs)
        for name in ("pointing", "energy", "deletion", "insertion"):
            if name in opts.metrics:
                values = [p[name] for p in pairs if not math.isnan(p[name])]
                out[name] = float(np.mean(values)) if values else math.nan
        for name in ("deletion", "insertion"):
            curves = [p[f"{name}_curve"] for p in pairs if f"{name}_curve" in p]
            if name in opts.metrics and curves:  # the mean curve over the pairs, 5 % steps
                out[f"{name}_curve"] = [round(float(v), 5) for v in np.mean(curves, axis=0)]
        if "maxboxacc" in opts.metrics:
            acc = MaxBoxAcc()
            for p in pairs:
                acc.add(np.array([c == "1" for c in p["box"]]))
            box = acc.result()
            at = threshold_index(BOX_THRESHOLDS, fixed.get(method, {}).get("maxboxacc"))
            out["maxboxacc"] = (box.max_box_acc if at is None else float(box.curve[at])) * 100
            out["maxboxacc_threshold"] = box.threshold if at is None else float(BOX_THRESHOLDS[at])
            out["maxboxacc_curve"] = [round(float(v) * 100, 4) for v in box.curve]
        results[method] = out
    intervals = bootstrap_intervals(records, opts.methods, opts.metrics, fixed=fixed)
    for method, cis in intervals.items():
        for name, ci in cis.items():
            results[method][f"{name}_ci"] = ci
    return results


def tuned_thresholds(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """The thresholds each method's results chose (to fix them on another split)."""
    return {
        method: {k: r[f"{k}_threshold"] for k in ("miou", "maxboxacc") if f"{k}_threshold" in r}
        for method, r in results.items()
    }


def write_report(
    json_path: Path,
    results: dict[str, Any],
    records: Sequence[dict[str, Any]],
    backend: Backend,
    dataset: EvalDataset,
    texts: Texts,
    opts: EvalOptions,
    tuning: dict[str, Any] | None = None,
) -> Path:
    """Write the results JSON and, beside it, a per-image CSV; returns the CSV's path.

    tuning: where mIoU's and MaxBoxAcc's thresholds were chosen (split, images, thresholds);
        None: on the scored images themselves.
    """
    ok = [r for r in records if r["status"] == "ok"]
    write_json_atomic(
        json_path,
        {
            **provenance(),
            "model": backend.identity,
            "device": str(backend.device),
            "speed": backend.speed,
            "dataset": {
                "root": str(dataset.root),
                "format": dataset.format,
                "name": dataset.name,
                "size": len(dataset),
                "scored": len(ok),
                "failed": [
                    {"image": r["image"], "error": r["error"]}
                    for r in records
                    if r["status"] == "failed"
                ],
            },  # fmt: skip
            "prompts": dict(zip(dataset.classes, texts.prompts, strict=True)),
            "ensemble": texts.ensemble,
            "methods": list(opts.methods),
            "metrics": list(opts.metrics),
            "pointing_tolerance_px": opts.pointing_tolerance,
            "thresholds_chosen_on": tuning or "the scored images",
            # `<metric>_ci`: 95 % percentile bootstrap over images (threshold search included)
            "intervals": {
                "level": CI_LEVEL,
                "resamples": RESAMPLES,
                "seed": 0,
                "resampled": "images",
            },
            "curves": {
                "miou_thresholds": MIOU_THRESHOLDS.tolist(),
                "maxboxacc_thresholds": BOX_THRESHOLDS.tolist(),
                "deletion_insertion_fractions": [round(0.05 * k, 2) for k in range(21)],
            },
            "method_options": opts.method_options,
            "results": _json_safe(results),
            "finished": datetime.now(UTC).isoformat(timespec="seconds"),
        },
    )
    csv_path = json_path.with_suffix(".per_image.csv")
    columns = [
        "image",
        "class",
        "method",
        "area",
        "msc",
        "pointing",
        "energy",
        "deletion",
        "insertion",
    ]
    with (
        atomic_path(csv_path) as tmp,
        open(tmp, "w", newline="", encoding="utf-8", errors="backslashreplace") as f,
    ):
        writer = csv.writer(f)
        writer.writerow(columns)
        for r in ok:
            for p in r["pairs"]:
                writer.writerow(
                    [r["image"], p["class"], p["method"]] + [_cell(p.get(c)) for c in columns[3:]]
                )
    return csv_path


def _json_safe(value: Any) -> Any:
    """NaN is not JSON: write it as null."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.6g}"
    return str(value)


def write_segment_results(
    json_path: Path,
    results: dict[str, Any],
    records: Sequence[dict[str, Any]],
    backend: Backend,
    dataset: SegDataset,
    classes: ClassNames,
    opts: SegmentEvalOptions,
    preset: str | None = None,
) -> None:
    """Write the results JSON of a segmentation eval: the numbers of every row, the settings
    they were computed with (protocol, classes, label rule, preset) and the failed images."""
    from .segment_eval import SEGMENT_METRICS, protocol_json

    ok = [r for r in records if r["status"] == "ok"]
    write_json_atomic(
        json_path,
        {
            **provenance(),
            "task": "segment",
            "model": backend.identity,
            "device": str(backend.device),
            "precision": str(backend.autocast_dtype or "fp32"),
            "dataset": {
                "root": str(dataset.root),
                "format": dataset.format,
                "name": dataset.name,
                "split": dataset.split,
                "benchmark": dataset.benchmark,
                "reduce_zero_label": dataset.reduce_zero_label,
                "ignore_index": 255,
                "size": len(dataset),
                "scored": len(ok),
                "failed": [
                    {"image": r["image"], "error": r["error"]}
                    for r in records
                    if r["status"] == "failed"
                ],
            },  # fmt: skip
            "classes": [list(line) for line in classes.lines],
            "methods": list(opts.methods),
            "rows": {
                name: {"method": m, "protocol": protocol_json(p)} for name, m, p in opts.rows()
            },  # fmt: skip
            "preset": preset,
            "protocol": protocol_json(opts.protocol),
            "metrics": list(SEGMENT_METRICS),
            "metric": "mmseg IoUMetric: per-class intersection and union summed over the split, "
            "mIoU the mean over classes present or predicted, ×100",
            "intervals": {
                "level": CI_LEVEL,
                "resamples": RESAMPLES,
                "seed": 0,
                "resampled": "images",
            },  # fmt: skip
            "method_options": opts.method_options,
            "results": _json_safe(results),
            "finished": datetime.now(UTC).isoformat(timespec="seconds"),
        },
    )
