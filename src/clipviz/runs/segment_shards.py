"""Segmenting WebDataset shards: one output shard per input shard, resumable by shard.

Layout::

    OUT/run.json                         what was asked (kind `segment_shards`)
    OUT/manifest.jsonl                   one line per shard: samples done, failed, files
    OUT/shards/<name>.tar                per sample `<key>.labels.png`: class indices at the
                                         original size (the palette PNG of `clipviz segment`)
    OUT/shards/<name>.parquet            per sample: key, status, error, caption, width,
                                         height, the classes present and every class's share
                                         of the pixels (a list in label order)

As for explain runs over shards, a table whose metadata holds this request's key marks its
shard done; rank r of a torchrun job takes shards r, r + world, …
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..data.shards import ShardWriter, read_parquet_metadata, write_parquet_atomic
from ..distributed import Dist
from ..errors import ClipvizError
from ..files import SCHEMA_VERSION, provenance
from ..segment import Segmenter
from ..segment.outputs import labels_png
from .explain import RunSummary, check_run_args, default_pool_size, job_summary
from .manifest import append_record, disk_full_stops, source_stamp
from .prepare import prepare_run
from .segment import SegmentRequest, segment_fields
from .shard_decode import IncompleteShard, decoded_batches
from .shards import SHARDS, ShardTable, _unwritten, add_shard, shard_name


class FullSize:
    """What shard decoding runs in place of the model's preprocessing: the image as it is,
    uint8 `[H, W, 3]` (the segmenter resizes and cuts it itself)."""

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return torch.from_numpy(np.array(image.convert("RGB")))

    def crop_box(self, width: int, height: int) -> tuple[int, int, int, int]:
        return (0, 0, width, height)


class SegmentTable(ShardTable):
    COLUMNS = ("key", "status", "error", "caption", "width", "height", "classes", "shares")  # type: ignore[assignment]


def run_segment_shards(
    segmenter: Segmenter,
    shards: Sequence[Path],
    out: Path,
    request: SegmentRequest,
    fields: dict[str, Any] | None = None,
    on_record: Callable[[dict[str, Any]], None] | None = None,
    dist: Dist = Dist(),
) -> RunSummary:
    """Segment every sample of every shard into one output shard each (see the module); the
    summary counts samples, `on_record` is called with each shard's manifest record."""
    check_run_args(out, request.batch_size, request.workers, request.max_pixels)
    names = [shard_name(p) for p in shards]
    if len(set(names)) < len(names):
        twice = next(n for n in names if names.count(n) > 1)
        raise ClipvizError(f"two shards are named {twice}; their outputs would collide")
    run = {**segment_fields(segmenter), **(fields or {}), "key": request.key,
           "shards": [str(p) for p in shards]}  # fmt: skip
    summary = RunSummary()
    kind = "segment_shards"
    with prepare_run(out, kind, run, overwrite=request.overwrite, dist=dist) as manifest:
        for path in list(shards)[dist.rank :: dist.world]:
            rec = _segment_shard(segmenter, path, out, request)
            add_shard(summary, append_record(manifest, rec))
            if on_record:
                on_record(rec)
    if dist.world > 1 and dist.main:
        return job_summary(out, [os.path.realpath(p) for p in shards], add_shard)
    return summary


def _segment_shard(
    segmenter: Segmenter, path: Path, out: Path, request: SegmentRequest
) -> dict[str, Any]:
    started = time.perf_counter()
    name = shard_name(path)
    tar_path, table_path = out / SHARDS / f"{name}.tar", out / SHARDS / f"{name}.parquet"
    stamp = source_stamp(path)
    record: dict[str, Any] = {
        "input": os.path.realpath(path), "output": f"{SHARDS}/{name}", "key": request.key,
        "source": stamp, "outputs": [f"{name}.tar", f"{name}.parquet"],
    }  # fmt: skip
    done = read_parquet_metadata(table_path)
    info = json.loads(done.get("clipviz", "{}")) if done else {}
    if (not request.overwrite and info.get("key") == request.key
            and info.get("source") == stamp and tar_path.is_file()):  # fmt: skip
        return {**record, "status": "skipped", "error": None, "samples": info.get("samples", 0),
                "failed_samples": info.get("failed", 0), "seconds": 0.0}  # fmt: skip
    workers = default_pool_size() if request.workers is None else request.workers
    loader = decoded_batches(path, FullSize(), request.max_pixels, workers,  # type: ignore[arg-type]
                             request.batch_size)  # fmt: skip
    try:
        with disk_full_stops(tar_path), ShardWriter(tar_path) as tar:
            table = SegmentTable(tar)
            _segment_samples(loader, table, segmenter)
    except IncompleteShard as e:  # the tar was not kept: the next run redoes the shard
        return {**record, "status": "failed", "error": str(e), "samples": 0,
                "failed_samples": 0, "outputs": [], "seconds": 0.0}  # fmt: skip
    except OSError as e:
        return _unwritten(record, e)
    samples = len(table.columns["key"])
    if samples == 1 and str(table.columns["key"][0]).endswith("#unreadable"):
        tar_path.unlink(missing_ok=True)  # nothing was read: the next run tries again
        return {**record, "status": "failed", "error": table.columns["error"][0], "samples": 1,
                "failed_samples": 1, "outputs": [], "seconds": 0.0}  # fmt: skip
    meta = {"key": request.key, "source": stamp, "samples": samples, "failed": table.failed,
            "classes": [list(line) for line in segmenter.classes.lines],
            "schema_version": SCHEMA_VERSION, **provenance()}  # fmt: skip
    try:
        with disk_full_stops(table_path):
            write_parquet_atomic(table_path, table.columns, {"clipviz": json.dumps(meta)})
    except OSError as e:
        return _unwritten(record, e)
    return {**record, "status": "ok", "error": None, "samples": samples,
            "failed_samples": table.failed,
            "seconds": round(time.perf_counter() - started, 3)}  # fmt: skip


def _segment_samples(loader: Any, table: SegmentTable, segmenter: Segmenter) -> None:
    """Segment the decoded samples of one shard into `table` (rows and tar members)."""
    k = len(segmenter.classes)
    for batch in loader:
        good = [d for d in batch if d.error is None]
        for d in batch:
            if d.error is not None:
                table.add(d.index, {"key": d.key, "status": "failed", "error": d.error,
                                    "caption": d.caption}, [])  # fmt: skip
        if not good:
            continue
        try:
            results = segmenter([d.tensor.numpy() for d in good])
        except ClipvizError:
            raise
        except Exception as e:  # noqa: BLE001 - report the batch, go on with the next
            for d in good:
                table.add(d.index, {"key": d.key, "status": "failed", "caption": d.caption,
                                    "error": f"model failed: {type(e).__name__}: {e}"}, [])  # fmt: skip
            continue
        for d, result in zip(good, results, strict=True):
            row = {"key": d.key, "caption": d.caption, "width": d.size[0], "height": d.size[1]}
            if result.labels is None:
                table.add(d.index, {**row, "status": "failed", "error": result.error}, [])
                continue
            counts = np.bincount(result.labels.ravel(), minlength=k)
            shares = (counts / counts.sum()).round(6).tolist()
            table.add(d.index, {**row, "status": "ok", "error": None,
                                "classes": [int(c) for c in np.flatnonzero(counts)],
                                "shares": shares},
                      [(f"{d.key}.labels.png", labels_png(result.labels, k))])  # fmt: skip
    if table.waiting:  # a sample never came back: the table cannot be complete
        raise IncompleteShard(
            f"{len(table.waiting)} samples after sample {table.next} were decoded but "
            f"sample {table.next} never was; run again"
        )
