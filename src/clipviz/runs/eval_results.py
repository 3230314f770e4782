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
from .eval_stats import CI_LEVEL, RESAMPLES, bootstrap_intervals

if TYPE_CHECKING:
    from .evaluate import EvalOptions


def reduce_records(records: Sequence[dict[str, Any]], opts: EvalOptions) -> dict[str, Any]:
    """Dataset-level numbers per method from the per-pair records."""
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
            out["miou"] = res.miou * 100
            out["miou_threshold"] = res.threshold
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
            out["maxboxacc"] = box.max_box_acc * 100
            out["maxboxacc_threshold"] = box.threshold
            out["maxboxacc_curve"] = [round(float(v) * 100, 4) for v in box.curve]
        results[method] = out
    intervals = bootstrap_intervals(records, opts.methods, opts.metrics)
    for method, cis in intervals.items():
        for name, ci in cis.items():
            results[method][f"{name}_ci"] = ci
    return results


def write_report(
    json_path: Path,
    results: dict[str, Any],
    records: Sequence[dict[str, Any]],
    backend: Backend,
    dataset: EvalDataset,
    texts: Texts,
    opts: EvalOptions,
) -> Path:
    """Write the results JSON and, beside it, a per-image CSV; returns the CSV's path."""
    ok = [r for r in records if r["status"] == "ok"]
    write_json_atomic(
        json_path,
        {
            **provenance(),
            "model": backend.identity,
            "device": str(backend.device),
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
