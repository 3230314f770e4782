"""How long each method takes per image, against a bare forward pass measured in the same run."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..backend import Backend
from ..data.inputs import InputItem
from ..errors import ClipvizError
from ..explanation import explain
from ..methods import get_method, methods
from ..segment import Segmenter

NOT_BY_DEFAULT = frozenset({"random", "eclip", "convis", "proxyclip", "cass"})


# a figure whose fastest and slowest repeats differ by more than this share of the median
# was measured on a busy machine: it is flagged, not trusted
NOISY_SPREAD = 0.2


@dataclass(frozen=True)
class BenchRow:
    """One timed figure: milliseconds per image and the ratio to the bare forward pass of
    the same repeat, each as the median with the fastest and slowest repeat."""

    name: str
    ms_per_image: float  # median
    ratio: float  # median of the per-repeat ratios to the forward pass
    note: str = ""
    ms_min: float = float("nan")
    ms_max: float = float("nan")
    ratio_min: float = float("nan")
    ratio_max: float = float("nan")

    @property
    def spread(self) -> float:
        """(slowest − fastest) / median of the milliseconds."""
        return (self.ms_max - self.ms_min) / self.ms_per_image if self.ms_per_image else 0.0

    @property
    def noisy(self) -> bool:
        return self.spread > NOISY_SPREAD


def bench_row(name: str, seconds: Sequence[float], forward: Sequence[float], images: int,
              note: str = "") -> BenchRow:  # fmt: skip
    """A row from per-repeat seconds (for `images` images) and the forward's seconds per
    image in the same repeats."""
    ms = [t / images * 1e3 for t in seconds]
    ratios = [m / (f * 1e3) for m, f in zip(ms, forward, strict=True)]
    return BenchRow(name, statistics.median(ms), statistics.median(ratios), note,
                    min(ms), max(ms), min(ratios), max(ratios))  # fmt: skip


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _seconds(fn: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


# WordNet nouns, so every method (ConVis reads a prompt as a concept) takes them
NOUNS = ("dog", "cat", "car", "tree", "bird", "house", "boat", "chair", "flower", "bicycle")


def bench_prompts(n: int) -> list[str]:
    """`n` distinct prompts that are nouns ("dog", …, then "dog 2", … past ten)."""
    return [NOUNS[i % len(NOUNS)] + (f" {i // len(NOUNS) + 1}" if i >= len(NOUNS) else "")
            for i in range(n)]  # fmt: skip


def default_methods() -> list[str]:
    """Every method that needs no extra input (eclip needs a checkpoint, convis WordNet and a
    concept bank, proxyclip and cass a proxy model: time them by naming them)."""
    return [m for m in methods() if m not in NOT_BY_DEFAULT]


def _check_counts(batch_size: int, n_prompts: int, repeats: int) -> None:
    if batch_size < 1 or n_prompts < 1 or repeats < 1:
        raise ClipvizError("`batch_size`, `prompts` and `repeats` must be at least 1")


def bare_forward(backend: Backend, batch_size: int) -> tuple[torch.Tensor, Callable[[], object]]:
    """A seeded batch of noise images `[B, 3, H, W]` on the device and the bare forward pass
    on it (`encode_image`, no gradients, the backend's precision) that every ratio divides by."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch_size, 3, *backend.input_size, generator=generator)
    images = images.to(backend.device)

    def forward() -> object:
        with torch.no_grad(), backend.autocast():
            return backend.model.encode_image(images)

    return images, forward


def run_bench(
    backend: Backend,
    method_names: Sequence[str] | None = None,
    batch_size: int = 8,
    n_prompts: int = 3,
    repeats: int = 5,
    options: dict[str, dict[str, object]] | None = None,
) -> list[BenchRow]:
    """Milliseconds per image of each method, and its ratio to `model.encode_image` on the
    same batch, timed in `repeats` rounds (the forward pass first in each round, so every
    ratio compares timings taken moments apart). Methods that do not support this model's
    tower are listed with a note."""
    _check_counts(batch_size, n_prompts, repeats)
    names = list(method_names) if method_names else default_methods()
    specs = [get_method(m) for m in names]
    images, forward = bare_forward(backend, batch_size)
    texts = backend.encode_texts(bench_prompts(n_prompts))

    runnable = [s for s in specs if s.info.fits(backend.tower, backend.vision.capabilities)]
    jobs: dict[str, Callable[[], object]] = {"forward (encode_image)": forward}
    for spec in runnable:
        jobs[spec.name] = lambda spec=spec: explain(  # type: ignore[misc]
            backend, images, texts, spec.name, options=(options or {}).get(spec.name)
        )
    for job in jobs.values():
        job()  # warm-up: kernels, caches, lazy allocations
    times: dict[str, list[float]] = {name: [] for name in jobs}
    for _ in range(repeats):
        for name, job in jobs.items():
            times[name].append(_seconds(job, backend.device))
    forward_per_image = [t / batch_size for t in times["forward (encode_image)"]]
    rows = []
    for name in ["forward (encode_image)", *(spec.name for spec in specs)]:
        if name in times:
            rows.append(bench_row(name, times[name], forward_per_image, batch_size))
        else:
            rows.append(BenchRow(name, float("nan"), float("nan"), f"{backend.tower}: n/a"))
    return rows


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MB (Linux: ru_maxrss is in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@dataclass(frozen=True)
class PipelineBench:
    """`explain` over a folder against the bare forward pass, round by round."""

    rows: list[BenchRow]  # forward, then the end-to-end run
    images: int
    rss_early_mb: float  # peak RSS after the first tenth of the images (at most 200)
    rss_end_mb: float  # peak RSS at the end of the first round
    rss_early_at: int


def run_pipeline_bench(
    backend: Backend,
    items: Sequence[InputItem],
    methods: Sequence[str] = ("itsm",),
    batch_size: int = 8,
    n_prompts: int = 3,
    repeats: int = 3,
    workers: int | None = None,
    writers: int | None = None,
    options: dict[str, dict[str, object]] | None = None,
) -> PipelineBench:
    """Images per second of `run_explain` over `items` with the default outputs, written to a
    temporary folder, as a ratio to the bare forward pass (`encode_image` on batches of
    `batch_size`, as many images as the run) timed just before each round. `options`: each
    method's options, by method name."""
    import tempfile

    from .explain import run_explain

    if not items:
        raise ClipvizError("the pipeline benchmark needs a folder with images")
    _check_counts(batch_size, n_prompts, repeats)
    texts = backend.encode_texts(bench_prompts(n_prompts))
    _, forward = bare_forward(backend, batch_size)

    passes = max(2, min(16, len(items) // batch_size))
    forward()
    n = len(items)
    early_at = max(1, min(200, n // 10))
    rss: dict[str, float] = {}
    fwd: list[float] = []  # seconds per image
    runs: list[float] = []  # seconds per image

    def note_memory(rec: dict[str, object], done: list[int]) -> None:
        done[0] += 1
        if done[0] == early_at and "early" not in rss:
            rss["early"] = peak_rss_mb()

    for _ in range(repeats):
        fwd.append(
            sum(_seconds(forward, backend.device) for _ in range(passes)) / (passes * batch_size)
        )
        with tempfile.TemporaryDirectory(prefix="clipviz-bench-") as out:
            count = [0]
            seconds = _seconds(
                lambda: run_explain(
                    backend, items, texts, Path(out), methods, batch_size, workers=workers,
                    writers=writers, on_record=lambda rec: note_memory(rec, count),  # noqa: B023
                    method_options=options,
                ),
                backend.device,
            )  # fmt: skip
        runs.append(seconds / n)
        rss.setdefault("end", peak_rss_mb())
    # the pipeline's ratio is in images per second: the forward's time over the run's
    speed = [f / t for f, t in zip(fwd, runs, strict=True)]
    ms = [t * 1e3 for t in runs]
    forward_row = bench_row("forward (encode_image)", [f * n for f in fwd], fwd, n)
    run_row = BenchRow(f"explain {n} images ({', '.join(methods)})", statistics.median(ms),
                       statistics.median(speed), "", min(ms), max(ms), min(speed), max(speed))  # fmt: skip
    return PipelineBench([forward_row, run_row], n, rss.get("early", rss["end"]), rss["end"],
                         early_at)  # fmt: skip


def window_forward(
    segmenter: Segmenter, items: Sequence[InputItem]
) -> tuple[int, Callable[[], object]]:
    """The windows a segment run slides over `items` (resized and cut as it cuts them, in
    batches of its window batch and of one size) and the bare forward pass over them
    (`image_embedding`, no gradients, the backend's precision); returns (windows, forward)."""
    import numpy as np

    from ..data.images import ImageError, load_image

    backend, unit = segmenter.backend, segmenter.unit
    groups: dict[tuple[int, int], list[torch.Tensor]] = {}
    for item in items:
        try:
            prepared = segmenter.prepare(np.asarray(load_image(item.path)))
        except ImageError:
            continue  # the run records it as failed; the forward has no window of it
        for w in prepared.windows:
            h, wd = w.size
            sh, sw = h - h % unit[0], wd - wd % unit[1]
            if min(sh, sw) > 0:
                crop = prepared.image[:, w.top : w.top + sh, w.left : w.left + sw]
                groups.setdefault((sh, sw), []).append(crop)
    batches = [
        torch.stack(crops[i : i + segmenter.window_batch])
        for crops in groups.values()
        for i in range(0, len(crops), segmenter.window_batch)
    ]

    def forward() -> object:
        with torch.no_grad(), backend.autocast():
            return [backend.vision.image_embedding(b) for b in batches]

    return sum(len(b) for b in batches), forward


def run_segment_bench(
    segmenter: Segmenter,
    items: Sequence[InputItem],
    batch_size: int = 8,
    repeats: int = 3,
    workers: int | None = None,
    writers: int | None = None,
) -> PipelineBench:
    """Windows per second of a whole segment run over `items` (decoding, the method on every
    window, merging, classifying, labels and overlays written to a temporary folder), as a
    ratio to the bare forward pass over the same windows timed just before each round."""
    import tempfile

    from .segment import SegmentRequest, run_segment, segment_key

    if not items:
        raise ClipvizError("the segment benchmark needs a folder with images")
    _check_counts(batch_size, 1, repeats)
    windows, forward = window_forward(segmenter, items)
    if not windows:
        raise ClipvizError("no image of the folder could be segmented; pass a folder of images")
    request = SegmentRequest(segment_key(segmenter, False, 0.5), batch_size, workers=workers,
                             writers=writers)  # fmt: skip
    forward()
    early_at = max(1, min(200, len(items) // 10))
    rss: dict[str, float] = {}
    fwd: list[float] = []  # seconds per window
    runs: list[float] = []  # seconds per window

    def note_memory(done: list[int]) -> None:
        done[0] += 1
        if done[0] == early_at and "early" not in rss:
            rss["early"] = peak_rss_mb()

    for _ in range(repeats):
        fwd.append(_seconds(forward, segmenter.backend.device) / windows)
        with tempfile.TemporaryDirectory(prefix="clipviz-bench-") as out:
            count = [0]
            seconds = _seconds(
                lambda: run_segment(segmenter, items, Path(out), request,  # noqa: B023
                                    on_record=lambda rec: note_memory(count)),  # noqa: B023
                segmenter.backend.device,
            )  # fmt: skip
        runs.append(seconds / windows)
        rss.setdefault("end", peak_rss_mb())
    speed = [f / t for f, t in zip(fwd, runs, strict=True)]  # in windows per second
    ms = [t * 1e3 for t in runs]
    forward_row = bench_row("forward (image_embedding)", fwd, fwd, 1)
    run_row = BenchRow(
        f"segment {len(items)} images, {windows} windows ({segmenter.method.name})",
        statistics.median(ms), statistics.median(speed), "", min(ms), max(ms), min(speed),
        max(speed),
    )  # fmt: skip
    return PipelineBench([forward_row, run_row], len(items), rss.get("early", rss["end"]),
                         rss["end"], early_at)  # fmt: skip
