"""Explaining many images: decoding in worker processes, outputs per image, a resumable manifest.

Layout of a run directory::

    OUT/run.json                       what was asked (model, methods, prompts, options)
    OUT/manifest.jsonl                 one line per image per run: status, files, scores, error
    OUT/<input path>/maps.npz          raw maps [T, h, w], upsampled maps, prompts, scores
    OUT/<input path>/<slug>.overlay.png, <slug>.heatmap.png

One run writes into a folder at a time (a lock); a killed run leaves no half files (its
temporaries are removed by the next run, a torn manifest line is cut); a full disk stops the
run with the finished images kept; an input replaced since it was done is done again.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..backend import Backend, Texts
from ..data.images import DEFAULT_MAX_PIXELS
from ..data.inputs import InputItem
from ..distributed import Dist
from ..errors import ClipvizError
from ..explanation import Explanation, check_prompt_text, explain
from ..files import SCHEMA_VERSION
from ..methods import check_methods, get_method
from .decode import Decoded, image_loader
from .manifest import (
    append_record,
    check_out,
    disk_full_stops,
    finished,
    latest_records,
    methods_proxy_weights,
    source_stamp,
)
from .outputs import RenderOptions, write_outputs
from .prepare import prepare_run
from .writers import OrderedWriters


@dataclass
class RunSummary:
    ok: int = 0
    skipped: int = 0
    failed: int = 0
    records: list[dict[str, Any]] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0

    def add(self, rec: dict[str, Any]) -> None:
        """Count one image's record."""
        self.records.append(rec)
        setattr(self, rec["status"], getattr(self, rec["status"]) + 1)


@dataclass(frozen=True)
class ExplainRequest:
    """What a run asks of every image or shard: its methods with their options, how they are
    batched, decoded and written, and the `key` that tells its outputs from other runs'."""

    methods: tuple[str, ...]
    options: dict[str, dict[str, Any]]  # each method's bound options, by method name
    key: str
    batch_size: int = 16
    overwrite: bool = False
    workers: int | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS
    render: RenderOptions = RenderOptions()
    writers: int | None = None
    maps_dtype: str = "float16"  # of the raw maps in output shards


def run_fields(backend: Backend, texts: Texts, request: ExplainRequest) -> dict[str, Any]:
    """What the run.json of an explain run (of images or shards) records."""
    return {
        "model": backend.identity,
        "device": str(backend.device),
        "speed": backend.speed,
        "crop": backend.preprocess.crop,
        "methods": list(request.methods),
        "prompts": texts.prompts,
        "ensemble": texts.ensemble,
        "options": request.options,
        "key": request.key,
    }


def request_key(
    backend: Backend,
    methods: Sequence[str],
    texts: Texts,
    render: RenderOptions,
    options: dict[str, Any] | None = None,
) -> str:
    """What makes two runs' outputs interchangeable; a finished image is skipped only on a match
    (a local proxy's weights count by size and time; absent otherwise, so earlier keys hold)."""
    request = {
        "schema_version": SCHEMA_VERSION,
        "model": backend.content_identity,
        "crop": backend.preprocess.crop,
        "methods": list(methods),
        "prompts": texts.prompts,
        "ensemble": texts.ensemble,
        "render": render.key(),
        "options": options or {},
    }
    if stamps := methods_proxy_weights(options or {}):
        request["proxy_weights"] = stamps
    blob = json.dumps(request, sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def check_prompts(prompts: Sequence[str]) -> None:
    """Prompts of a run: none blank, none twice (their files and scores are keyed by prompt)."""
    check_prompt_text(prompts)
    seen: set[str] = set()
    twice = [p for p in prompts if p in seen or seen.add(p)]  # type: ignore[func-returns-value]
    if twice:
        raise ClipvizError(f"prompt {twice[0]!r} is given twice; pass each prompt once")


def check_run_args(
    out: Path, batch_size: int, workers: int | None, max_pixels: int, writers: int | None = None
) -> None:
    """Refuse, before any work, arguments a run cannot use."""
    check_out(out)
    if writers is not None and writers < 0:
        raise ClipvizError(f"`writers` {writers} must be 0 (write in the model's thread) or more")
    if workers is not None and workers < 0:
        raise ClipvizError(f"`workers` {workers} must be 0 (decode in this process) or more")
    if max_pixels < 1:
        raise ClipvizError(f"`max_pixels` {max_pixels} must be at least 1")
    if batch_size < 1:
        raise ClipvizError(f"`batch_size` {batch_size} must be at least 1")


def default_pool_size(items: int | None = None) -> int:
    """Decoding processes or writer threads when not given: one per core, at most 4 (none
    for a single item, where starting them costs more than they save)."""
    if items is not None and items <= 1:
        return 0
    return min(4, os.cpu_count() or 1)


def run_explain(
    backend: Backend,
    items: Sequence[InputItem],
    texts: Texts,
    out: Path,
    methods: Sequence[str] = ("itsm",),
    batch_size: int = 16,
    overwrite: bool = False,
    render: RenderOptions = RenderOptions(),
    workers: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    on_record: Callable[[dict[str, Any]], None] | None = None,
    method_options: dict[str, dict[str, Any]] | None = None,
    writers: int | None = None,
    dist: Dist = Dist(),
) -> RunSummary:
    """Explain every item, writing outputs and one manifest line per image as it finishes.

    Images finished by an earlier run with the same request are skipped unless `overwrite`.
    `on_record` is called with each manifest record (for progress display);
    `method_options` holds each method's options, by method name; `writers` is the number
    of threads writing outputs while the model works (0: the model waits for the writing;
    default: up to 4, one per core). In a torchrun job (`dist`) rank r explains items
    r, r + world, …, appending to its own manifest part, which rank 0 merges at the end.
    """
    check_run_args(out, batch_size, workers, max_pixels, writers)
    check_prompts(texts.prompts)
    check_methods(backend, methods)
    options = {m: get_method(m).info.bind((method_options or {}).get(m)) for m in methods}
    request = ExplainRequest(
        tuple(methods), options, request_key(backend, methods, texts, render, options),
        batch_size, overwrite, workers, max_pixels, render, writers,
    )  # fmt: skip
    fields = {**run_fields(backend, texts, request), "render": asdict(render)}
    with prepare_run(out, "explain", fields, overwrite=overwrite, dist=dist) as manifest:
        mine = items[dist.rank :: dist.world]  # every rank its own images, none twice
        summary = _run(backend, mine, texts, out, request, manifest, on_record)
    if dist.world > 1 and dist.main:
        return job_summary(out, [it.key for it in items], RunSummary.add)
    return summary


def job_summary(
    out: Path, inputs: Sequence[str], add: Callable[[RunSummary, dict[str, Any]], None]
) -> RunSummary:
    """The summary of a whole torchrun job, read by rank 0 from the merged manifest: the
    latest record of each of `inputs`, counted by `add`."""
    latest = latest_records(out)
    summary = RunSummary()
    for key in inputs:
        if key in latest:
            add(summary, latest[key])
    return summary


def _run(
    backend: Backend,
    items: Sequence[InputItem],
    texts: Texts,
    out: Path,
    request: ExplainRequest,
    manifest: Path,
    on_record: Callable[[dict[str, Any]], None] | None,
) -> RunSummary:
    methods, options, render = request.methods, request.options, request.render
    batch_size, workers, writers = request.batch_size, request.workers, request.writers
    summary = RunSummary()

    def record(rec: dict[str, Any]) -> None:
        rec["key"] = request.key
        summary.add(append_record(manifest, rec))
        if on_record:
            on_record(rec)

    done = {} if request.overwrite else finished(out, request.key, {it.key for it in items})
    todo = []
    for it in items:
        prev = done.get(it.key)
        if prev is None:
            todo.append(it)
            continue
        record({**prev, "status": "skipped", "seconds": 0.0})

    if workers is None:
        workers = default_pool_size(len(todo))
    if writers is None:
        writers = default_pool_size(len(todo))
    loader = image_loader(
        todo, backend.preprocess, batch_size, workers, request.max_pixels, render.max_side
    )
    with OrderedWriters(writers, record, max_pending=2 * batch_size) as pool:
        for batch in loader:
            started = time.perf_counter()
            good: list[Decoded] = [d for d in batch if d.error is None]
            for d in batch:
                if d.error is not None:
                    pool.put(_failure(todo[d.index], d.error))
            if not good:
                continue
            images = torch.stack([d.tensor for d in good])  # type: ignore[misc]
            for d in good:
                d.tensor = None  # the batch holds it now; the writers keep only the picture
            if backend.device.type == "cuda":
                images = images.pin_memory()  # the copy to the device overlaps the model
            try:
                explanations = [
                    explain(backend, images, texts, m, options=options[m]) for m in methods
                ]
            except ClipvizError:
                raise
            except Exception as e:  # noqa: BLE001 - report and go on with the next batch
                for d in good:
                    pool.put(_failure(todo[d.index], f"model failed: {type(e).__name__}: {e}"))
                continue
            model_seconds = (time.perf_counter() - started) / len(good)
            for j, d in enumerate(good):
                pool.submit(_finish, todo[d.index], d, explanations, j, out, render, model_seconds)
    return summary


def _finish(
    item: InputItem,
    d: Decoded,
    explanations: Sequence[Explanation],
    j: int,
    out: Path,
    render: RenderOptions,
    model_seconds: float,
) -> dict[str, Any]:
    """Write image `j`'s outputs and return its manifest record (run by a writer thread)."""
    t0 = time.perf_counter()
    if bad := non_finite(explanations, j):
        return _failure(item, bad)
    try:
        assert d.display is not None  # decoded without error
        with disk_full_stops(out / item.rel):
            written = write_outputs(
                out / item.rel, d.display, explanations, j, render, d.crop, d.size
            )
    except OSError as e:
        return _failure(item, f"could not write outputs: {e}")
    first = explanations[0]
    scores = dict(zip(first.prompts, first.scores[j].tolist(), strict=True))
    probs = dict(zip(first.prompts, first.probs[j].tolist(), strict=True))
    return {
        "input": item.key,
        "output": str(item.rel),
        "status": "ok",
        "error": None,
        "source": source_stamp(item.path),
        "outputs": written.files,
        "prompt_files": written.prompt_files,
        "size": list(d.size),
        "crop": list(d.crop),
        "scores": scores,
        "probs": probs,
        "top": max(probs, key=probs.__getitem__),
        **token_importance(explanations, j),
        "seconds": round(model_seconds + time.perf_counter() - t0, 4),
    }


def token_importance(explanations: Sequence[Explanation], j: int) -> dict[str, Any]:
    """`{"text_importance": {method: {prompt: [[token, weight], …]}}}` for image `j`, from the
    methods that explain the text side too (Grad-ECLIP); empty when none did."""
    found: dict[str, Any] = {}
    for exp in explanations:
        weights, tokens = exp.extras.get("text_importance"), exp.labels.get("text_tokens")
        if weights is None or tokens is None:
            continue
        found[exp.method] = {
            prompt: [
                [tok, round(float(w), 4)]
                for tok, w in zip(row, weights[j, t].tolist(), strict=True)
                if tok
            ]
            for t, (prompt, row) in enumerate(zip(exp.prompts, tokens, strict=True))
        }
    return {"text_importance": found} if found else {}


def non_finite(explanations: Sequence[Explanation], j: int) -> str | None:
    """The reason image `j` cannot be reported: a method's maps or scores are NaN or inf."""
    for exp in explanations:
        if not bool(torch.isfinite(exp.maps[j]).all()):
            return f"method {exp.method} gave non-finite maps (NaN or inf) for this image"
        if not bool(torch.isfinite(exp.scores[j]).all()):
            return f"non-finite scores (NaN or inf) with method {exp.method} for this image"
    return None


def _failure(item: InputItem, error: str) -> dict[str, Any]:
    return {
        "input": item.key,
        "output": str(item.rel),
        "status": "failed",
        "error": error,
        "outputs": [],
        "seconds": 0.0,
    }
