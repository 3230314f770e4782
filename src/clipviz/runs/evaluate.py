"""Scoring methods on a dataset with masks or boxes, resumably.

Every method runs over the same images in one pass of loading. Each image contributes one
record per (present class, method) — the metric *counts* (per-threshold intersections and
unions, per-threshold box correctness, score contrast, pointing hit, …), not finished
means — appended to a JSON-lines file as soon as it is done. A killed run resumes where it
stopped, and the final numbers are always a reduction over those records.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..backend import Backend, Texts
from ..convis.classes import CLASS_SYNSETS
from ..data.datasets import EvalDataset, Sample
from ..data.datasets.common import crop_sample, mask_box
from ..data.images import DEFAULT_MAX_PIXELS, ImageError, load_image
from ..distributed import Dist, barrier
from ..errors import ClipvizError
from ..explanation import explain
from ..files import read_jsonl
from ..maps import normalize_maps, upsample_normalized
from ..methods import check_methods, get_method
from ..metrics import (
    BOX_THRESHOLDS,
    MIOU_THRESHOLDS,
    CurveResult,
    box_correct,
    deletion_insertion_curve,
    energy_pointing,
    iou_counts,
    pointing_hit,
    score_contrast,
)
from .eval_results import reduce_records
from .explain import non_finite
from .manifest import (
    append_record,
    merge_parts,
    methods_proxy_weights,
    part_path,
    repair_manifest,
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
    max_pixels: int = DEFAULT_MAX_PIXELS
    method_options: dict[str, dict[str, Any]] = field(default_factory=dict)  # by method


def read_class_prompts(path: str | Path, classes: Sequence[str]) -> dict[str, str]:
    """`class: prompt` (or tab-separated) lines; classes not listed keep their own name."""
    prompts: dict[str, str] = {}
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise ClipvizError(f"cannot read `classes_file` {path}: {e.strerror or e}") from e
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


def with_class_synsets(opts: EvalOptions, dataset: EvalDataset) -> EvalOptions:
    """ConVis on a VOC or COCO layout without `synsets`: each class's WordNet synset from the
    shipped table (class names are not all nouns WordNet knows, some are ambiguous)."""
    table = CLASS_SYNSETS.get(dataset.format, {})
    convis = opts.method_options.get("convis", {})
    if "convis" not in opts.methods or "synsets" in convis:
        return opts
    if not all(c in table for c in dataset.classes):
        return opts  # renamed classes (classes.txt): each class name is read as a noun
    synsets = [table[c] for c in dataset.classes]
    return replace(
        opts, method_options={**opts.method_options, "convis": {**convis, "synsets": synsets}}
    )


def default_metrics(dataset: EvalDataset) -> tuple[str, ...]:
    """The default metrics a dataset supports: box-only ones (CUB) drop the mask metrics."""
    if not dataset.has_masks:
        return tuple(m for m in DEFAULT_METRICS if m not in MASK_METRICS)
    return DEFAULT_METRICS


def check_metrics(metrics: Sequence[str], dataset: EvalDataset) -> None:
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ClipvizError(f"unknown metric {unknown[0]!r}; choose from: {', '.join(METRICS)}")
    if not dataset.has_masks and (need := [m for m in metrics if m in MASK_METRICS]):
        raise ClipvizError(
            f"metric {need[0]} needs masks, and {dataset.name} has boxes only; "
            "use `metric` maxboxacc/pointing/energy"
        )


def request_key(backend: Backend, dataset: EvalDataset, texts: Texts, opts: EvalOptions) -> str:
    """What makes two evaluations' per-image records interchangeable (a local proxy's weights
    count by size and time; absent otherwise, so earlier keys hold)."""
    request = {
        "model": backend.content_identity,
        "crop": backend.preprocess.crop,
        "dataset": [str(dataset.root), dataset.format, dataset.name],
        "prompts": texts.prompts,
        "ensemble": texts.ensemble,
        "methods": list(opts.methods),
        "metrics": list(opts.metrics),
        "tolerance": opts.pointing_tolerance,
        "options": opts.method_options,
    }
    if stamps := methods_proxy_weights(opts.method_options):
        request["proxy_weights"] = stamps
    blob = json.dumps(request, sort_keys=True, default=str)
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
    return [mask_box(sample.masks[cls])]


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
) -> CurveResult:
    """Deletion or insertion curve (and its AUC) of `cos(image embedding, text)` for one map."""

    def similarity(batch: torch.Tensor) -> torch.Tensor:
        return backend.image_embeddings(batch) @ text

    size = (image.shape[-2], image.shape[-1])
    sal = F.interpolate(norm_map[None, None], size=size, mode="bilinear", align_corners=False)
    return deletion_insertion_curve(image, sal[0, 0], similarity, mode=mode)  # type: ignore[arg-type]


def evaluate(
    backend: Backend,
    dataset: EvalDataset,
    texts: Texts,
    opts: EvalOptions,
    records_path: Path,
    on_image: Callable[[dict[str, Any]], None] | None = None,
    fixed: dict[str, dict[str, float]] | None = None,
    dist: Dist = Dist(),
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Run every method over `dataset`; returns (results per method, all image records).

    Records go to `records_path` (JSON lines) as images finish; images already recorded for
    the same request are not recomputed. fixed: thresholds chosen elsewhere, per method
    (see `reduce_records`). In a torchrun job (`dist`) rank r scores images r, r + world, …
    into its own part of the records, which rank 0 merges and reduces (the other ranks
    return no results).
    """
    check_metrics(opts.metrics, dataset)
    check_methods(backend, opts.methods)
    opts = with_class_synsets(opts, dataset)
    for m in opts.methods:  # bad options fail before the first image
        get_method(m).info.bind(opts.method_options.get(m))
    if opts.batch_size < 1:
        raise ClipvizError(f"`batch_size` {opts.batch_size} must be at least 1")
    key = request_key(backend, dataset, texts, opts)
    records_path.parent.mkdir(parents=True, exist_ok=True)
    if dist.main:
        repair_manifest(records_path)
        merge_parts(records_path)  # what the ranks of a killed job finished
    barrier(dist)
    own_records = records_path if dist.world == 1 else part_path(records_path, dist.rank)
    # one record per image (a merge of rank parts cut short may have appended one twice)
    records = list(
        {
            r["index"]: r
            for r in read_jsonl(records_path)
            if r.get("key") == key and r.get("status") == "ok"
        }.values()
    )
    done = {r["index"] for r in records}
    class_index = {c: i for i, c in enumerate(dataset.classes)}
    failed: list[dict[str, Any]] = []

    def emit(rec: dict[str, Any]) -> None:
        rec["key"] = key
        append_record(own_records, rec)
        (records if rec["status"] == "ok" else failed).append(rec)
        if on_image:
            on_image(rec)

    modes = [m for m in ("deletion", "insertion") if m in opts.metrics]
    todo = [i for i in range(dist.rank, len(dataset), dist.world) if i not in done]
    for start in range(0, len(todo), opts.batch_size):
        batch: list[tuple[int, Sample, torch.Tensor]] = []
        for i in todo[start : start + opts.batch_size]:
            try:
                sample = dataset[i]
                picture = load_image(sample.image_path, opts.max_pixels)
                if picture.size != sample.size:
                    raise ImageError(
                        f"image is {picture.width}x{picture.height} but its annotations are "
                        f"{sample.size[0]}x{sample.size[1]}; fix its annotations or drop the image"
                    )
                image = backend.preprocess(picture)
                # --crop center: the map covers the crop, and only the crop is scored
                sample = crop_sample(sample, backend.preprocess.crop_box(*sample.size))
            except (ClipvizError, ImageError) as e:
                emit(
                    {
                        "index": i,
                        "image": dataset.entry_name(i),
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
            m: explain(backend, images, texts, m, options=opts.method_options.get(m))
            for m in opts.methods
        }
        seconds = (time.perf_counter() - t0) / len(batch)
        for j, (i, sample, image) in enumerate(batch):
            w, h = sample.size
            pairs = []
            if bad := non_finite(list(per_method.values()), j):
                emit({"index": i, "image": str(sample.image_path), "status": "failed",
                      "error": bad})  # fmt: skip
                continue
            on_device = image.to(backend.device)
            for method, exp in per_method.items():
                for cls in sample.classes:
                    t = class_index[cls]
                    norm = upsample_normalized(exp.maps[j, t : t + 1], (h, w))[0].numpy()
                    pair: dict[str, Any] = {"method": method, "class": cls}
                    pair.update(
                        score_pair(norm, sample, cls, opts.metrics, opts.pointing_tolerance)
                    )
                    if modes:
                        small = normalize_maps(exp.maps[j, t])
                        text = texts.embeddings[t].to(backend.device)
                        for mode in modes:
                            curve = _faithfulness(backend, on_device, small, text, mode)
                            pair[mode] = curve.auc
                            pair[f"{mode}_curve"] = [round(float(v), 5) for v in curve.scores]
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
    if dist.world > 1:
        barrier(dist)
        if not dist.main:
            return {}, records + failed
        merge_parts(records_path)
        latest = {r["index"]: r for r in read_jsonl(records_path) if r.get("key") == key}
        records = [r for r in latest.values() if r["status"] == "ok"]
        failed = [r for r in latest.values() if r["status"] != "ok"]
    records.sort(key=lambda r: r["index"])
    return reduce_records(records, opts, fixed), records + failed
