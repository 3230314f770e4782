"""Explaining WebDataset shards: one output shard per input shard, resumable by shard.

Layout::

    OUT/run.json                         what was asked
    OUT/manifest.jsonl                   one line per shard: samples done, failed, files
    OUT/shards/<name>.tar                per sample `<key>.maps.npy`: the raw maps [T, h, w]
                                         at patch resolution (float16 unless asked otherwise;
                                         `<key>.<method>.maps.npy` when several methods ran)
    OUT/shards/<name>.parquet            per sample: key, status, error, caption, width,
                                         height, crop, top prompt, scores, probs (in the
                                         order of the prompts in its metadata)

A shard's tar is written, then its parquet table, each to a temporary name renamed into
place: a table whose metadata holds this request's key marks the shard done, so a killed
run resumes at the first shard it had not finished. Rank r of a torchrun job takes shards
r, r + world, …
"""

from __future__ import annotations

import io
import json
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np
import torch

from ..backend import Backend, Preprocess, Texts
from ..data.images import DEFAULT_MAX_PIXELS
from ..data.shards import (
    SHARD_SUFFIXES,
    ShardWriter,
    read_parquet_metadata,
    write_parquet_atomic,
)
from ..distributed import Dist
from ..errors import ClipvizError
from ..explanation import Explanation, explain
from ..files import SCHEMA_VERSION, provenance
from ..methods import check_methods, get_method
from .explain import (
    ExplainRequest,
    RunSummary,
    check_prompts,
    check_run_args,
    default_pool_size,
    job_summary,
    non_finite,
    request_key,
    run_fields,
)
from .manifest import append_record, disk_full_stops, source_stamp
from .outputs import MAP_DTYPES, RenderOptions
from .prepare import prepare_run
from .run_json import run_kind
from .shard_decode import DecodedSample, IncompleteShard, decoded_batches

SHARDS = "shards"
T = TypeVar("T")


def is_shard_run(out: Path) -> bool:
    """Whether `out` holds a shard run."""
    return run_kind(out) == "shards"


def shard_name(path: Path) -> str:
    """`data/00042.tar` -> `00042` (the name of its output shard)."""
    name = path.name
    for suffix in SHARD_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


EXPLAIN_COLUMNS = ("key", "status", "error", "caption", "width", "height", "crop", "top",
                   "scores", "probs")  # fmt: skip


class ShardTable:
    """The rows of one output shard, taken in any order and written in the shard's."""

    def __init__(self, tar: ShardWriter, columns: Sequence[str]) -> None:
        self.tar = tar
        self.columns: dict[str, list[Any]] = {c: [] for c in columns}
        self.waiting: dict[int, tuple[dict[str, Any], list[tuple[str, bytes]]]] = {}
        self.next = 0

    def add(self, index: int, row: dict[str, Any], members: list[tuple[str, bytes]]) -> None:
        self.waiting[index] = (row, members)
        while self.next in self.waiting:
            row, members = self.waiting.pop(self.next)
            for name, data in members:
                self.tar.add(name, data)
            for c, values in self.columns.items():
                values.append(row.get(c))
            self.next += 1

    @property
    def failed(self) -> int:
        return sum(s == "failed" for s in self.columns["status"])


class ShardRequest(Protocol):
    """What writing output shards reads of a run's request."""

    @property
    def key(self) -> str: ...
    @property
    def batch_size(self) -> int: ...
    @property
    def overwrite(self) -> bool: ...
    @property
    def workers(self) -> int | None: ...
    @property
    def max_pixels(self) -> int: ...


def check_shard_names(shards: Sequence[Path]) -> None:
    """Refuse two input shards whose output shards would have the same name."""
    names = [shard_name(p) for p in shards]
    if len(set(names)) < len(names):
        twice = next(n for n in names if names.count(n) > 1)
        raise ClipvizError(f"two shards are named {twice}; their outputs would collide")


def run_shards(
    shards: Sequence[Path],
    out: Path,
    kind: str,
    fields: dict[str, Any],
    overwrite: bool,
    one_shard: Callable[[Path], dict[str, Any]],
    on_record: Callable[[dict[str, Any]], None] | None,
    dist: Dist,
) -> RunSummary:
    """Run `one_shard` on this rank's shards (r, r + world, …) into one manifest in `out`,
    a run of `kind` asked with `fields`; the summary counts samples (on rank 0 of a torchrun
    job, the whole job's)."""
    summary = RunSummary()
    with prepare_run(out, kind, fields, overwrite=overwrite, dist=dist) as manifest:
        for path in list(shards)[dist.rank :: dist.world]:
            rec = one_shard(path)
            add_shard(summary, append_record(manifest, rec))
            if on_record:
                on_record(rec)
    if dist.world > 1 and dist.main:
        return job_summary(out, [os.path.realpath(p) for p in shards], add_shard)
    return summary


def run_explain_shards(
    backend: Backend,
    shards: Sequence[Path],
    texts: Texts,
    out: Path,
    methods: Sequence[str] = ("itsm",),
    batch_size: int = 16,
    overwrite: bool = False,
    workers: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    on_record: Callable[[dict[str, Any]], None] | None = None,
    method_options: dict[str, dict[str, Any]] | None = None,
    maps_dtype: str = "float16",
    dist: Dist = Dist(),
) -> RunSummary:
    """Explain every sample of every shard into one output shard each (see the module).

    The summary counts samples; `on_record` is called with each shard's manifest record.
    """
    check_run_args(out, batch_size, workers, max_pixels)
    check_prompts(texts.prompts)
    check_methods(backend, methods)
    if maps_dtype not in MAP_DTYPES:
        raise ClipvizError(f"`maps_dtype` {maps_dtype!r}: choose from {', '.join(MAP_DTYPES)}")
    check_shard_names(shards)
    options = {m: get_method(m).info.bind((method_options or {}).get(m)) for m in methods}
    key = request_key(backend, methods, texts, RenderOptions(), {**options, "maps": maps_dtype})
    request = ExplainRequest(
        tuple(methods), options, key, batch_size, overwrite, workers, max_pixels,
        maps_dtype=maps_dtype,
    )  # fmt: skip
    fields = {**run_fields(backend, texts, request), "maps": maps_dtype,
              "shards": [str(p) for p in shards]}  # fmt: skip
    return run_shards(
        shards, out, "shards", fields, overwrite,
        lambda path: _explain_shard(backend, path, texts, out, request), on_record, dist,
    )  # fmt: skip


def add_shard(summary: RunSummary, rec: dict[str, Any]) -> None:
    """Count one shard's record by its samples."""
    summary.records.append(rec)
    if rec["status"] == "skipped":  # its failed samples stay failed (listed in its table)
        summary.skipped += rec["samples"] - rec["failed_samples"]
        summary.failed += rec["failed_samples"]
    elif rec["status"] == "failed":  # the shard as a whole
        summary.failed += max(1, rec["failed_samples"])
    else:
        summary.ok += rec["samples"] - rec["failed_samples"]
        summary.failed += rec["failed_samples"]


def _explain_shard(
    backend: Backend, path: Path, texts: Texts, out: Path, request: ExplainRequest
) -> dict[str, Any]:
    meta = {"prompts": texts.prompts, "methods": list(request.methods),
            "maps": request.maps_dtype}  # fmt: skip
    return write_shard(
        path, out, request, backend.preprocess, EXPLAIN_COLUMNS,
        lambda batches, table: _explain_samples(batches, table, backend, texts, request), meta,
    )  # fmt: skip


def write_shard(
    path: Path,
    out: Path,
    request: ShardRequest,
    preprocess: Preprocess,
    columns: Sequence[str],
    fill: Callable[[Iterator[list[DecodedSample]], ShardTable], None],
    meta: dict[str, Any],
) -> dict[str, Any]:
    """Write the output shard of input shard `path` and return its manifest record: the tar,
    whose members `fill` adds with the rows of a table of `columns` from the samples decoded
    by `preprocess`, then the table, whose metadata (with `meta`) marks the shard done. A shard
    this request finished from the same source is skipped."""
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
    if (
        not request.overwrite
        and info.get("key") == request.key
        and info.get("source") == stamp
        and tar_path.is_file()
    ):
        return {**record, "status": "skipped", "error": None, "samples": info.get("samples", 0),
                "failed_samples": info.get("failed", 0), "seconds": 0.0}  # fmt: skip
    workers = default_pool_size() if request.workers is None else request.workers
    batches = decoded_batches(path, preprocess, request.max_pixels, workers, request.batch_size)
    try:
        with disk_full_stops(tar_path), ShardWriter(tar_path) as tar:
            table = ShardTable(tar, columns)
            fill(batches, table)
    except IncompleteShard as e:  # the tar was not kept: the next run redoes the shard
        return {**record, "status": "failed", "error": str(e), "samples": 0,
                "failed_samples": 0, "outputs": [], "seconds": 0.0}  # fmt: skip
    except OSError as e:  # this shard's outputs cannot be written (a full disk stops the run)
        return _unwritten(record, e)
    samples = len(table.columns["key"])
    unreadable = samples == 1 and str(table.columns["key"][0]).endswith("#unreadable")
    if unreadable:  # nothing was read: leave no outputs, so the next run tries again
        tar_path.unlink(missing_ok=True)
        return {**record, "status": "failed", "error": table.columns["error"][0], "samples": 1,
                "failed_samples": 1, "outputs": [], "seconds": 0.0}  # fmt: skip
    meta = {"key": request.key, "source": stamp, "samples": samples, "failed": table.failed,
            **meta, "schema_version": SCHEMA_VERSION, **provenance()}  # fmt: skip
    try:
        with disk_full_stops(table_path):
            write_parquet_atomic(table_path, table.columns, {"clipviz": json.dumps(meta)})
    except OSError as e:
        return _unwritten(record, e)
    return {**record, "status": "ok", "error": None, "samples": samples,
            "failed_samples": table.failed,
            "seconds": round(time.perf_counter() - started, 3)}  # fmt: skip


def _unwritten(record: dict[str, Any], error: OSError) -> dict[str, Any]:
    """The record of a shard whose outputs could not be written: failed with the reason, and
    done again by the next run."""
    return {**record, "status": "failed", "error": f"could not write outputs: {error}",
            "samples": 0, "failed_samples": 0, "outputs": [], "seconds": 0.0}  # fmt: skip


def model_batches(
    batches: Iterable[list[DecodedSample]],
    table: ShardTable,
    model: Callable[[list[DecodedSample]], T],
) -> Iterator[tuple[list[DecodedSample], T]]:
    """Each batch's decoded samples with what `model` made of them, in order; the rows of the
    samples that could not be decoded, and of a batch the model failed on, go to `table` here.
    Raises `IncompleteShard` at the end if a sample never came back."""
    for batch in batches:
        good = [d for d in batch if d.error is None]
        for d in batch:
            if d.error is not None:
                table.add(d.index, {"key": d.key, "status": "failed", "error": d.error,
                                    "caption": d.caption}, [])  # fmt: skip
        if not good:
            continue
        try:
            result = model(good)
        except ClipvizError:
            raise
        except Exception as e:  # noqa: BLE001 - report the batch, go on with the next
            for d in good:
                table.add(d.index, {"key": d.key, "status": "failed", "caption": d.caption,
                                    "error": f"model failed: {type(e).__name__}: {e}"}, [])  # fmt: skip
            continue
        yield good, result
    if table.waiting:  # a sample never came back: the table cannot be complete
        raise IncompleteShard(
            f"{len(table.waiting)} samples after sample {table.next} were decoded but "
            f"sample {table.next} never was; run again"
        )


def _explain_samples(
    batches: Iterable[list[DecodedSample]],
    table: ShardTable,
    backend: Backend,
    texts: Texts,
    request: ExplainRequest,
) -> None:
    """Explain the decoded samples of one shard into `table` (rows and tar members)."""
    methods, options, maps_dtype = request.methods, request.options, request.maps_dtype
    several = len(methods) > 1

    def explain_batch(good: list[DecodedSample]) -> list[Explanation]:
        images = torch.stack([d.tensor for d in good])  # type: ignore[misc]
        return [explain(backend, images, texts, m, options=options[m]) for m in methods]

    for good, exps in model_batches(batches, table, explain_batch):
        for j, d in enumerate(good):
            row = {"key": d.key, "caption": d.caption, "width": d.size[0],
                   "height": d.size[1], "crop": list(d.crop)}  # fmt: skip
            if bad := non_finite(exps, j):
                table.add(d.index, {**row, "status": "failed", "error": bad}, [])
                continue
            probs = exps[0].probs[j].tolist()
            members = [
                (f"{d.key}.{e.method}.maps.npy" if several else f"{d.key}.maps.npy",
                 _npy(e.maps[j].numpy().astype(maps_dtype)))
                for e in exps
            ]  # fmt: skip
            table.add(d.index, {**row, "status": "ok", "error": None,
                                "top": texts.prompts[int(np.argmax(probs))],
                                "scores": exps[0].scores[j].tolist(), "probs": probs},
                      members)  # fmt: skip
