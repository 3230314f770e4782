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

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..distributed import Dist
from ..segment import Segmentation, Segmenter
from ..segment.outputs import labels_png
from .explain import RunSummary, check_run_args
from .segment import SegmentRequest, segment_fields
from .shard_decode import DecodedSample
from .shards import ShardTable, check_shard_names, model_batches, run_shards, write_shard


class FullSize:
    """What shard decoding runs in place of the model's preprocessing: the image as it is,
    uint8 `[H, W, 3]` (the segmenter resizes and cuts it itself)."""

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return torch.from_numpy(np.array(image.convert("RGB")))

    def crop_box(self, width: int, height: int) -> tuple[int, int, int, int]:
        return (0, 0, width, height)


SEGMENT_COLUMNS = ("key", "status", "error", "caption", "width", "height", "classes", "shares")


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
    check_shard_names(shards)
    run = {**segment_fields(segmenter), **(fields or {}), "key": request.key,
           "shards": [str(p) for p in shards]}  # fmt: skip
    return run_shards(
        shards, out, "segment_shards", run, request.overwrite,
        lambda path: _segment_shard(segmenter, path, out, request), on_record, dist,
    )  # fmt: skip


def _segment_shard(
    segmenter: Segmenter, path: Path, out: Path, request: SegmentRequest
) -> dict[str, Any]:
    meta = {"classes": [list(line) for line in segmenter.classes.lines]}
    return write_shard(
        path, out, request, FullSize(), SEGMENT_COLUMNS,  # type: ignore[arg-type]
        lambda batches, table: _segment_samples(batches, table, segmenter), meta,
    )  # fmt: skip


def _segment_samples(
    batches: Iterable[list[DecodedSample]], table: ShardTable, segmenter: Segmenter
) -> None:
    """Segment the decoded samples of one shard into `table` (rows and tar members)."""
    k = len(segmenter.classes)

    def segment_batch(good: list[DecodedSample]) -> list[Segmentation]:
        return segmenter([d.tensor.numpy() for d in good])  # type: ignore[union-attr]

    for good, results in model_batches(batches, table, segment_batch):
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
