"""Segmenting many images: decoding in worker processes, the model on batches, outputs written
by threads, a resumable manifest; the same run folder rules as explain runs.

Layout of a run directory::

    OUT/run.json                       what was asked (model, method, protocol, classes)
    OUT/manifest.jsonl                 one line per image per run: status, files, classes, error
    OUT/<input path>/labels.png        class indices at the original size (VOC palette)
    OUT/<input path>/overlay.png       the labels over the image, with a legend
    OUT/<input path>/probs.npz         (with `save_probs`) class probabilities
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.captions import as_list
from ..data.images import DEFAULT_MAX_PIXELS, ImageError, load_image
from ..data.inputs import InputItem
from ..distributed import Dist
from ..errors import ClipvizError
from ..files import SCHEMA_VERSION
from ..segment import Segmenter
from ..segment.outputs import write_segmentation
from .decode import Decoded, die_with_parent, shared_memory_has_room
from .explain import RunSummary, check_run_args, default_pool_size, job_summary
from .manifest import append_record, disk_full_stops, latest_records, proxy_weights, source_stamp
from .prepare import prepare_run
from .writers import OrderedWriters


@dataclass(frozen=True)
class SegmentRequest:
    """How a segment run batches, decodes and writes, and the `key` that tells its outputs
    from other runs'."""

    key: str
    batch_size: int = 8
    overwrite: bool = False
    workers: int | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS
    writers: int | None = None
    save_probs: bool = False
    alpha: float = 0.5


def segment_fields(segmenter: Segmenter) -> dict[str, Any]:
    """What the run.json of a segment run records of its segmenter."""
    protocol = segmenter.protocol
    return {
        "model": segmenter.backend.identity,
        "device": str(segmenter.backend.device),
        "method": segmenter.method.name,
        "options": segmenter.options,
        "protocol": {**protocol.__dict__, "pamr_dilations": list(protocol.pamr_dilations)},
        "classes": [list(line) for line in segmenter.classes.lines],
        "precision": str(segmenter.backend.autocast_dtype or "fp32"),
    }


def segment_key(segmenter: Segmenter, save_probs: bool, alpha: float) -> str:
    """What makes two segment runs' outputs interchangeable; a finished image is skipped only
    on a match."""
    fields = segment_fields(segmenter)
    request = {
        "schema_version": SCHEMA_VERSION,
        "model": segmenter.backend.content_identity,
        **{k: fields[k] for k in ("method", "options", "protocol", "classes", "precision")},
        "save_probs": save_probs,
        "alpha": alpha,
    }
    if stamps := proxy_weights(segmenter.options):  # absent otherwise: earlier keys still hold
        request["proxy_weights"] = stamps
    blob = json.dumps(request, sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


class _Pictures(torch.utils.data.Dataset):
    """Decodes images at their full size in DataLoader workers; a bad file yields its error,
    not an exception, so one bad file never stops a run."""

    def __init__(self, items: Sequence[InputItem], max_pixels: int, shared: bool) -> None:
        self.items, self.max_pixels, self.shared = items, max_pixels, shared

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Decoded:
        if self.items[i].error is not None:
            return Decoded(i, error=self.items[i].error)
        try:
            image = np.array(load_image(self.items[i].path, self.max_pixels))
            pixels = torch.from_numpy(image) if self.shared else image
            return Decoded(i, pixels=pixels, size=(image.shape[1], image.shape[0]))
        except ImageError as e:
            return Decoded(i, error=str(e))
        except MemoryError:
            return Decoded(i, error="out of memory decoding this image; lower `max_pixels`")
        except Exception as e:  # noqa: BLE001 - one bad file must not stop the run
            return Decoded(i, error=f"{type(e).__name__}: {e}")


def picture_loader(
    items: Sequence[InputItem], batch_size: int, workers: int, max_pixels: int
) -> torch.utils.data.DataLoader:
    """Batches of `Decoded` images (`pixels` at full size), decoded in `workers` processes."""
    shared = workers > 0 and shared_memory_has_room()
    return torch.utils.data.DataLoader(
        _Pictures(items, max_pixels, shared),
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=as_list,
        worker_init_fn=die_with_parent if workers else None,
    )


def finished_segments(out: Path, key: str, inputs: set[str]) -> dict[str, dict[str, Any]]:
    """Of `inputs` (keys), those whose latest record is complete for this request, whose
    labels exist and whose file has not changed since."""
    return {
        inp: rec
        for inp, rec in latest_records(out).items()
        if inp in inputs
        and rec.get("status") in ("ok", "skipped")
        and rec.get("key") == key
        and (out / rec.get("output", "") / "labels.png").is_file()
        and rec.get("source") is not None
        and rec.get("source") == source_stamp(Path(inp))
    }


def run_segment(
    segmenter: Segmenter,
    items: Sequence[InputItem],
    out: Path,
    request: SegmentRequest,
    fields: dict[str, Any] | None = None,
    on_record: Callable[[dict[str, Any]], None] | None = None,
    dist: Dist = Dist(),
) -> RunSummary:
    """Segment every item, writing its outputs and one manifest line as it finishes.

    Images finished by an earlier run with the same request are skipped unless `overwrite`.
    `fields`: what run.json records beside the segmenter's settings (a preset, its sources);
    `on_record` is called with each manifest record. In a torchrun job (`dist`) rank r takes
    items r, r + world, …, appending to its own manifest part, merged by rank 0 at the end.
    """
    check_run_args(out, request.batch_size, request.workers, request.max_pixels, request.writers)
    if not 0 <= request.alpha <= 1:
        raise ClipvizError(f"`alpha` {request.alpha} must be between 0 and 1")
    run = {**segment_fields(segmenter), **(fields or {}), "key": request.key}
    with prepare_run(out, "segment", run, overwrite=request.overwrite, dist=dist) as manifest:
        mine = items[dist.rank :: dist.world]
        summary = _run(segmenter, mine, out, request, manifest, on_record)
    if dist.world > 1 and dist.main:
        return job_summary(out, [it.key for it in items], RunSummary.add)
    return summary


def _run(
    segmenter: Segmenter,
    items: Sequence[InputItem],
    out: Path,
    request: SegmentRequest,
    manifest: Path,
    on_record: Callable[[dict[str, Any]], None] | None,
) -> RunSummary:
    summary = RunSummary()

    def record(rec: dict[str, Any]) -> None:
        rec["key"] = request.key
        summary.add(append_record(manifest, rec))
        if on_record:
            on_record(rec)

    keys = {it.key for it in items}
    done = {} if request.overwrite else finished_segments(out, request.key, keys)
    todo = []
    for it in items:
        prev = done.get(it.key)
        if prev is None:
            todo.append(it)
        else:
            record({**prev, "status": "skipped", "seconds": 0.0})
    workers = default_pool_size(len(todo)) if request.workers is None else request.workers
    writers = default_pool_size(len(todo)) if request.writers is None else request.writers
    loader = picture_loader(todo, request.batch_size, workers, request.max_pixels)
    labels = segmenter.classes.labels
    with OrderedWriters(writers, record, max_pending=2 * request.batch_size) as pool:
        for batch in loader:
            started = time.perf_counter()
            good: list[Decoded] = [d for d in batch if d.error is None]
            for d in batch:
                if d.error is not None:
                    pool.put(_failure(todo[d.index], d.error))
            if not good:
                continue
            try:
                results = segmenter([d.display for d in good], request.save_probs)  # type: ignore[misc]
            except ClipvizError:
                raise
            except Exception as e:  # noqa: BLE001 - report and go on with the next batch
                for d in good:
                    pool.put(_failure(todo[d.index], f"model failed: {type(e).__name__}: {e}"))
                continue
            seconds = (time.perf_counter() - started) / len(good)
            for d, result in zip(good, results, strict=True):
                item = todo[d.index]
                if result.labels is None:
                    pool.put(_failure(item, str(result.error)))
                    continue
                probs = result.probs.numpy() if result.probs is not None else None
                pool.submit(_finish, item, d, result.labels, probs, labels, out, request,
                            seconds, (result.resized, result.windows))  # fmt: skip
    return summary


def class_shares(labels: np.ndarray, num_classes: int) -> dict[str, float]:
    """Each present class's share of the image's pixels, by class index (as text, for JSON)."""
    counts = np.bincount(labels.ravel(), minlength=num_classes)
    return {str(c): round(float(n) / labels.size, 6) for c, n in enumerate(counts) if n}


def _finish(
    item: InputItem,
    d: Decoded,
    labels: np.ndarray,
    probs: np.ndarray | None,
    class_labels: list[str],
    out: Path,
    request: SegmentRequest,
    model_seconds: float,
    grid: tuple[tuple[int, int], int],
) -> dict[str, Any]:
    """Write one image's outputs and return its manifest record (run by a writer thread)."""
    t0 = time.perf_counter()
    try:
        assert d.display is not None  # decoded without error
        with disk_full_stops(out / item.rel):
            written = write_segmentation(
                out / item.rel, d.display, labels, class_labels, probs, request.alpha
            )
    except OSError as e:
        return _failure(item, f"could not write outputs: {e}")
    shares = class_shares(labels, len(class_labels))
    return {
        "input": item.key,
        "output": str(item.rel),
        "status": "ok",
        "error": None,
        "source": source_stamp(item.path),
        "files": {kind: Path(path).name for kind, path in written.items()},
        "size": list(d.size),
        "resized": list(grid[0]),
        "windows": grid[1],
        "classes": [int(c) for c in shares],
        "shares": shares,
        "seconds": round(model_seconds + time.perf_counter() - t0, 4),
    }


def _failure(item: InputItem, error: str) -> dict[str, Any]:
    return {
        "input": item.key,
        "output": str(item.rel),
        "status": "failed",
        "error": error,
        "files": {},
        "seconds": 0.0,
    }
