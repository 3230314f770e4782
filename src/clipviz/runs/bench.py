"""How long each method takes per image, against a bare forward pass measured in the same run."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..backend import Backend
from ..errors import ClipvizError
from ..explanation import explain
from ..methods import get_method, methods

NOT_BY_DEFAULT = frozenset({"random", "eclip", "convis"})


@dataclass(frozen=True)
class BenchRow:
    name: str
    ms_per_image: float
    ratio: float  # to the bare forward pass
    note: str = ""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_seconds(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    fn()  # warm-up: kernels, caches, lazy allocations
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# WordNet nouns, so every method (ConVis reads a prompt as a concept) takes them
NOUNS = ("dog", "cat", "car", "tree", "bird", "house", "boat", "chair", "flower", "bicycle")


def bench_prompts(n: int) -> list[str]:
    """`n` distinct prompts that are nouns ("dog", …, then "dog 2", … past ten)."""
    return [NOUNS[i % len(NOUNS)] + (f" {i // len(NOUNS) + 1}" if i >= len(NOUNS) else "")
            for i in range(n)]  # fmt: skip


def default_methods() -> list[str]:
    """Every method that needs no extra input (eclip needs a checkpoint, convis WordNet and a
    concept bank: time them by naming them)."""
    return [m for m in methods() if m not in NOT_BY_DEFAULT]


def run_bench(
    backend: Backend,
    method_names: Sequence[str] | None = None,
    batch_size: int = 8,
    n_prompts: int = 3,
    repeats: int = 5,
    options: dict[str, dict[str, object]] | None = None,
) -> list[BenchRow]:
    """Median ms per image of each method, and its ratio to `model.encode_image` on the same
    batch. Methods that do not support this model's tower are listed with a note."""
    if batch_size < 1 or n_prompts < 1 or repeats < 1:
        raise ClipvizError("`batch_size`, `prompts` and `repeats` must be at least 1")
    names = list(method_names) if method_names else default_methods()
    specs = [get_method(m) for m in names]
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch_size, 3, *backend.input_size, generator=generator)
    images = images.to(backend.device)
    texts = backend.encode_texts(bench_prompts(n_prompts))

    def forward() -> object:
        with torch.no_grad(), backend.autocast():
            return backend.model.encode_image(images)

    base = _median_seconds(forward, backend.device, repeats)
    rows = [BenchRow("forward (encode_image)", base / batch_size * 1e3, 1.0)]
    for spec in specs:
        if not spec.info.fits(backend.tower, backend.vision.capabilities):
            rows.append(BenchRow(spec.name, float("nan"), float("nan"), f"{backend.tower}: n/a"))
            continue
        seconds = _median_seconds(
            lambda spec=spec: explain(  # type: ignore[misc]
                backend, images, texts, spec.name, options=(options or {}).get(spec.name)
            ),
            backend.device,
            repeats,
        )
        rows.append(BenchRow(spec.name, seconds / batch_size * 1e3, seconds / base))
    return rows
