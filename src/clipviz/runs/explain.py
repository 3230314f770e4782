"""Explaining many images: decoding in worker processes, outputs per image, a resumable manifest.

Layout of a run directory::

    OUT/run.json                       what was asked (model, methods, prompts, options)
    OUT/manifest.jsonl                 one line per image and run: status, files, scores, error
    OUT/<input path>/maps.npz          raw maps [T, h, w], upsampled maps, prompts, scores
    OUT/<input path>/<slug>.overlay.png, <slug>.heatmap.png
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..backend import Backend, Texts
from ..data.images import DEFAULT_MAX_PIXELS, ImageError, load_image
from ..data.inputs import InputItem
from ..errors import ClipvizError
from ..explanation import explain
from ..files import SCHEMA_VERSION, append_jsonl, provenance, read_jsonl, write_json_atomic
from ..methods import check_methods, get_method
from .outputs import RenderOptions, write_outputs

MANIFEST = "manifest.jsonl"


@dataclass
class RunSummary:
    ok: int = 0
    skipped: int = 0
    failed: int = 0
    records: list[dict[str, Any]] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0


class _DecodedImages(torch.utils.data.Dataset):
    """Decodes and preprocesses in DataLoader workers; a bad file yields its error, not an exception."""

    def __init__(self, items: Sequence[InputItem], preprocess: Any, max_pixels: int) -> None:
        self.items, self.preprocess, self.max_pixels = items, preprocess, max_pixels

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, np.ndarray | None, str | None]:
        try:
            image = load_image(self.items[i].path, self.max_pixels)
            return i, self.preprocess(image), np.asarray(image), None
        except ImageError as e:
            return i, None, None, str(e)
        except Exception as e:  # noqa: BLE001 - one bad file must not stop the run
            return i, None, None, f"{type(e).__name__}: {e}"


def _as_list(batch: list[Any]) -> list[Any]:
    return batch


def request_key(
    backend: Backend,
    methods: Sequence[str],
    texts: Texts,
    render: RenderOptions,
    options: dict[str, Any] | None = None,
) -> str:
    """What makes two runs' outputs interchangeable; a finished image is skipped only on a match."""
    blob = json.dumps(
        {
            **provenance(),
            "model": backend.identity,
            "crop": backend.preprocess.crop,
            "methods": list(methods),
            "prompts": texts.prompts,
            "ensemble": texts.ensemble,
            "render": asdict(render),
            "options": options or {},
        },
        sort_keys=True,
        default=str,
    )
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def _finished(out: Path, key: str) -> dict[str, dict[str, Any]]:
    """Inputs whose latest manifest record is complete for this request and whose files exist."""
    latest: dict[str, dict[str, Any]] = {}
    for rec in read_jsonl(out / MANIFEST):
        if "input" in rec:
            latest[rec["input"]] = rec
    return {
        inp: rec
        for inp, rec in latest.items()
        if rec.get("status") in ("ok", "skipped")
        and rec.get("key") == key
        and (out / rec.get("output", "") / "maps.npz").is_file()
    }


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
) -> RunSummary:
    """Explain every item, writing outputs and one manifest line per image as it finishes.

    Images finished by an earlier run with the same request are skipped unless `overwrite`.
    `on_record` is called with each manifest record (for progress display);
    `method_options` holds each method's options, by method name.
    """
    if batch_size < 1:
        raise ClipvizError(f"`batch_size` {batch_size} must be at least 1")
    check_methods(backend, methods)
    options = {m: get_method(m).info.bind((method_options or {}).get(m)) for m in methods}
    out.mkdir(parents=True, exist_ok=True)
    key = request_key(backend, methods, texts, render, options)
    write_json_atomic(
        out / "run.json",
        {
            **provenance(),
            "model": backend.identity,
            "device": str(backend.device),
            "crop": backend.preprocess.crop,
            "methods": list(methods),
            "prompts": texts.prompts,
            "ensemble": texts.ensemble,
            "render": asdict(render),
            "options": options,
            "key": key,
            "started": datetime.now(UTC).isoformat(timespec="seconds"),
        },
    )
    summary = RunSummary()

    def record(rec: dict[str, Any]) -> None:
        rec["key"] = key
        rec["schema_version"] = SCHEMA_VERSION
        append_jsonl(out / MANIFEST, rec)
        summary.records.append(rec)
        setattr(summary, rec["status"], getattr(summary, rec["status"]) + 1)
        if on_record:
            on_record(rec)

    done = {} if overwrite else _finished(out, key)
    todo = []
    for it in items:
        prev = done.get(str(it.path.resolve()))
        if prev is None:
            todo.append(it)
            continue
        record({**prev, "status": "skipped", "seconds": 0.0})

    if workers is None:
        workers = 0 if len(todo) <= 1 else min(4, os.cpu_count() or 1)
    loader = torch.utils.data.DataLoader(
        _DecodedImages(todo, backend.preprocess, max_pixels),
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=_as_list,
    )
    for batch in loader:
        started = time.perf_counter()
        good = [(i, x, img) for i, x, img, err in batch if err is None]
        for i, _, _, err in batch:
            if err is not None:
                record(_failure(todo[i], err))
        if not good:
            continue
        images = torch.stack([x for _, x, _ in good])
        try:
            explanations = [explain(backend, images, texts, m, options=options[m]) for m in methods]
        except ClipvizError:
            raise
        except Exception as e:  # noqa: BLE001 - report and go on with the next batch
            for i, _, _ in good:
                record(_failure(todo[i], f"model failed: {type(e).__name__}: {e}"))
            continue
        model_seconds = (time.perf_counter() - started) / len(good)
        for j, (i, _, img) in enumerate(good):
            t0 = time.perf_counter()
            item = todo[i]
            try:
                files = write_outputs(out / item.rel, img, explanations, j, render)
            except OSError as e:
                record(_failure(item, f"could not write outputs: {e}"))
                continue
            first = explanations[0]
            scores = dict(zip(first.prompts, first.scores[j].tolist(), strict=True))
            probs = dict(zip(first.prompts, first.probs[j].tolist(), strict=True))
            record(
                {
                    "input": str(item.path.resolve()),
                    "output": str(item.rel),
                    "status": "ok",
                    "error": None,
                    "outputs": files,
                    "size": [int(img.shape[1]), int(img.shape[0])],
                    "scores": scores,
                    "probs": probs,
                    "top": max(probs, key=probs.__getitem__),
                    "seconds": round(model_seconds + time.perf_counter() - t0, 4),
                }
            )
    return summary


def _failure(item: InputItem, error: str) -> dict[str, Any]:
    return {
        "input": str(item.path.resolve()),
        "output": str(item.rel),
        "status": "failed",
        "error": error,
        "outputs": [],
        "seconds": 0.0,
    }
