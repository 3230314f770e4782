"""Scoring methods on a dataset with masks or boxes, resumably.

Every method runs over the same images in one pass of loading. Each image contributes one
record per (present class, method) — the metric *counts* (per-threshold intersections and
unions, per-threshold box correctness, score contrast, pointing hit, …), not finished
means — appended to a JSON-lines file as soon as it is done. A killed run resumes where it
stopped, and the final numbers are always a reduction over those records.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .backend import Backend, Texts
from .data import ImageError, load_image
from .datasets import EvalDataset, Sample
from .errors import ClipvizError
from .explain import explain, upsample_normalized
from .files import append_jsonl, atomic_path, read_jsonl, write_json_atomic
from .methods import check_methods
from .metrics import (
    BOX_THRESHOLDS,
    MIOU_THRESHOLDS,
    MaxBoxAcc,
    MIoU,
    box_correct,
    deletion_insertion_curve,
    energy_pointing,
    iou_counts,
    mean_score_contrast,
    normalize_maps,
    pointing_hit,
    score_contrast,
)

METRICS = ("miou", "msc", "pointing", "energy", "maxboxacc", "deletion", "insertion")
MASK_METRICS = frozenset({"miou", "msc"})
DEFAULT_METRICS = ("miou", "msc", "pointing", "energy", "maxboxacc")
# Pascal VOC's class names as words CLIP knows (as CLIP Surgery's evaluation uses them).
VOC_PROMPTS = {"aeroplane": "aeroplane", "diningtable": "dining table",
               "pottedplant": "potted plant", "tvmonitor": "tv monitor"}  # fmt: skip


@dataclass(frozen=True)
class EvalOptions:
    methods: tuple[str, ...] = ("itsm",)
    metrics: tuple[str, ...] = DEFAULT_METRICS
    pointing_tolerance: float = 15.0
    batch_size: int = 16
    method_options: dict[str, Any] = field(default_factory=dict)


def read_class_prompts(path: str | Path, classes: Sequence[str]) -> dict[str, str]:
    """`class: prompt` (or tab-separated) lines; classes not listed keep their own name."""
    prompts: dict[str, str] = {}
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise ClipvizError(f"cannot read --classes-file {path}: {e.strerror or e}") from e
    for n, line in enumerate(lines, 1):
        if not line.strip() or line.startswith("#"):
            continue
        sep = "\t" if "\t" in line else ":"
        name, _, prompt = line.partition(sep)
        if not prompt.strip():
            raise ClipvizError(f"{path}:{n}: expected 'class: prompt', got {line!r}")
        if name.strip() not in classes:
            raise ClipvizError(
                f"{path}:{n}: {name.strip()!r} is not a class of this dataset "
                f"(classes: {', '.join(list(classes)[:8])}…)"
            )
        prompts[name.strip()] = prompt.strip()
    return prompts


def class_prompts(dataset: EvalDataset, classes_file: str | Path | None) -> list[str]:
    """The text for every dataset class, in class order."""
    overrides = read_class_prompts(classes_file, dataset.classes) if classes_file else {}
    base = VOC_PROMPTS if dataset.format == "voc" else {}
    return [overrides.get(c, base.get(c, c.replace("_", " "))) for c in dataset.classes]


def check_metrics(metrics: Sequence[str], dataset: EvalDataset) -> None:
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ClipvizError(f"unknown metric {unknown[0]!r}; choose from: {', '.join(METRICS)}")
    if dataset.format == "cub" and (need := [m for m in metrics if m in MASK_METRICS]):
        raise ClipvizError(
            f"metric {need[0]} needs masks, and a CUB dataset has boxes only; "
            "use --metric maxboxacc/pointing/energy"
        )


def request_key(backend: Backend, dataset: EvalDataset, texts: Texts, opts: EvalOptions) -> str:
    blob = json.dumps(
        {
            "model": backend.identity,
            "crop": backend.preprocess.crop,
            "dataset": [str(dataset.root), dataset.format, dataset.name],
            "prompts": texts.prompts,
            "ensemble": texts.ensemble,
            "methods": list(opts.methods),
            "metrics": list(opts.metrics),
            "tolerance": opts.pointing_tolerance,
            "options": opts.method_options,
        },
        sort_keys=True,
        default=str,
    )
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def _region(sample: Sample, cls: str) -> np.ndarray:
    """The class's mask, or (box-only data) the union of its boxes as a mask."""
    if cls in sample.masks:
        return sample.masks[cls]
    w, h = sample.size
    region = np.zeros((h, w), dtype=bool)
    for x0, y0, x1, y1 in sample.boxes.get(cls, []):
        region[int(y0) : int(math.ceil(y1)), int(x0) : int(math.ceil(x1))] = True
    return region


def _boxes(sample: Sample, cls: str) -> list[tuple[float, float, float, float]]:
    if sample.boxes.get(cls):
        return list(sample.boxes[cls])
    ys, xs = np.nonzero(sample.masks[cls])
    return [(float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))]


def score_pair(
    norm_map: np.ndarray, sample: Sample, cls: str, metrics: Sequence[str], tolerance: float
) -> dict[str, Any]:
    """Metric contributions of one (image, class) map at the image's size, in [0, 1]."""
    region = _region(sample, cls)
    valid = sample.valid
    rec: dict[str, Any] = {
        "area": float(region[valid].mean() if valid is not None else region.mean())
    }
    if "miou" in metrics:
        inter, union = iou_counts(norm_map, region, valid, MIOU_THRESHOLDS, cls)
        rec["iou_i"], rec["iou_u"] = inter.tolist(), union.tolist()
    if "msc" in metrics:
        rec["msc"] = score_contrast(norm_map, region, valid)
    if "pointing" in metrics:
        rec["pointing"] = int(pointing_hit(norm_map, region, tolerance))
    if "energy" in metrics:
        rec["energy"] = energy_pointing(norm_map, region)
    if "maxboxacc" in metrics:
        correct = box_correct(norm_map, _boxes(sample, cls), BOX_THRESHOLDS)
        rec["box"] = "".join("1" if c else "0" for c in correct)
    return rec


def _faithfulness(
    backend: Backend, image: torch.Tensor, norm_map: torch.Tensor, text: torch.Tensor, mode: str
) -> float:
    """Deletion or insertion AUC of `cos(image embedding, text)` for one map."""

    def similarity(batch: torch.Tensor) -> torch.Tensor:
        return backend.image_embeddings(batch) @ text

    size = (image.shape[-2], image.shape[-1])
    sal = F.interpolate(norm_map[None, None], size=size, mode="bilinear", align_corners=False)
    return deletion_insertion_curve(image, sal[0, 0], similarity, mode=mode).auc  # type: ignore[arg-type]


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
            out["miou_per_class"] = {k: v * 100 for k, v in res.per_class.items()}
        if "msc" in opts.metrics:
            out["msc"] = mean_score_contrast(p["msc"] for p in pairs)
        for name in ("pointing", "energy", "deletion", "insertion"):
            if name in opts.metrics:
                values = [p[name] for p in pairs if not math.isnan(p[name])]
                out[name] = float(np.mean(values)) if values else math.nan
        if "maxboxacc" in opts.metrics:
            acc = MaxBoxAcc()
            for p in pairs:
                acc.add(np.array([c == "1" for c in p["box"]]))
            box = acc.result()
            out["maxboxacc"] = box.max_box_acc * 100
            out["maxboxacc_threshold"] = box.threshold
        results[method] = out
    return results


def evaluate(
    backend: Backend,
    dataset: EvalDataset,
    texts: Texts,
    opts: EvalOptions,
    records_path: Path,
    on_image: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Run every method over `dataset`; returns (results per method, all image records).

    Records go to `records_path` (JSON lines) as images finish; images already recorded for
    the same request are not recomputed.
    """
    check_metrics(opts.metrics, dataset)
    check_methods(backend, opts.methods)
    if opts.batch_size < 1:
        raise ClipvizError(f"--batch-size {opts.batch_size} must be at least 1")
    key = request_key(backend, dataset, texts, opts)
    records_path.parent.mkdir(parents=True, exist_ok=True)
    records = [
        r for r in read_jsonl(records_path) if r.get("key") == key and r.get("status") == "ok"
    ]
    done = {r["index"] for r in records}
    class_index = {c: i for i, c in enumerate(dataset.classes)}
    failed: list[dict[str, Any]] = []

    def emit(rec: dict[str, Any]) -> None:
        rec["key"] = key
        append_jsonl(records_path, rec)
        (records if rec["status"] == "ok" else failed).append(rec)
        if on_image:
            on_image(rec)

    todo = [i for i in range(len(dataset)) if i not in done]
    for start in range(0, len(todo), opts.batch_size):
        batch: list[tuple[int, Sample, torch.Tensor]] = []
        for i in todo[start : start + opts.batch_size]:
            try:
                sample = dataset[i]
                image = backend.preprocess(load_image(sample.image_path))
            except (ClipvizError, ImageError) as e:
                emit(
                    {
                        "index": i,
                        "image": str(dataset.entries[i]),
                        "status": "failed",
                        "error": str(e),
                    }
                )
                continue
            batch.append((i, sample, image))
        if not batch:
            continue
        images = torch.stack([x for _, _, x in batch])
        t0 = time.perf_counter()
        per_method = {
            m: explain(backend, images, texts, m, options=opts.method_options) for m in opts.methods
        }
        seconds = (time.perf_counter() - t0) / len(batch)
        for j, (i, sample, image) in enumerate(batch):
            w, h = sample.size
            pairs = []
            for method, exp in per_method.items():
                for cls in sample.classes:
                    t = class_index[cls]
                    norm = upsample_normalized(exp.maps[j, t : t + 1], (h, w))[0].numpy()
                    pair: dict[str, Any] = {"method": method, "class": cls}
                    pair.update(
                        score_pair(norm, sample, cls, opts.metrics, opts.pointing_tolerance)
                    )
                    for mode in ("deletion", "insertion"):
                        if mode in opts.metrics:
                            small = normalize_maps(exp.maps[j, t])
                            text = texts.embeddings[t].to(backend.device)
                            pair[mode] = _faithfulness(
                                backend, image.to(backend.device), small, text, mode
                            )
                    pairs.append(pair)
            emit(
                {
                    "index": i,
                    "image": str(sample.image_path),
                    "status": "ok",
                    "classes": sample.classes,
                    "seconds": round(seconds, 4),
                    "pairs": pairs,
                }
            )
    records.sort(key=lambda r: r["index"])
    return reduce_records(records, opts), records + failed


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
    with atomic_path(csv_path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
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
