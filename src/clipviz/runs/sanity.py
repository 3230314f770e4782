"""`clipviz sanity`: the model-randomisation test of Adebayo et al. (NeurIPS 2018, "Sanity
Checks for Saliency Maps") for any method and model.

On a copy of the model, the image tower's layers are re-drawn one after another from the
top (the head, then the last block, … down to the first); after each step every method
explains the same images again and its maps are compared with the original ones: Spearman's
rank correlation of the raw maps and SSIM of the min-max normalised maps at the model's
input size. A map that still looks the same when the tower it claims to explain is random
does not explain that tower: such a method is flagged.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..backend import Backend, Texts
from ..backend.randomize import randomizable_copy, redraw
from ..compare import rank_correlation, ssim
from ..errors import ClipvizError
from ..explanation import explain
from ..files import atomic_path, provenance, write_json_atomic
from ..maps import upsample_normalized
from ..methods import check_methods

FLAG_THRESHOLD = 0.5  # rank correlation after the whole tower is random that flags a method


@dataclass(frozen=True)
class CascadeScores:
    """One method's similarity to its original maps after each randomisation step: mean and
    standard deviation over the (image, prompt) pairs, and pairs with a constant map (no
    rank correlation)."""

    spearman: list[float]
    spearman_std: list[float]
    ssim: list[float]
    ssim_std: list[float]
    undefined: list[int]
    flagged: bool


@dataclass(frozen=True)
class SanityResult:
    stages: list[str]  # the layers re-drawn at each step, cumulatively
    pairs: int
    threshold: float
    methods: dict[str, CascadeScores]


def method_maps(
    backend: Backend,
    images: torch.Tensor,
    texts: Texts,
    method: str,
    options: dict[str, Any],
    batch_size: int,
) -> torch.Tensor:
    """Raw maps `[N, T, h, w]` of one method over the preprocessed `images`, in batches."""
    chunks = [
        explain(backend, images[i : i + batch_size], texts, method=method, options=options).maps
        for i in range(0, len(images), batch_size)
    ]
    return torch.cat(chunks)


def compare_maps(
    original: torch.Tensor, other: torch.Tensor, pairs: torch.Tensor, size: tuple[int, int]
) -> tuple[list[float], list[float]]:
    """Spearman's ρ (raw maps) and SSIM (normalised, at `size`) of the chosen pairs."""
    rhos, ssims = [], []
    for n, t in pairs.nonzero().tolist():
        rhos.append(rank_correlation(original[n, t], other[n, t]))
        a = upsample_normalized(original[n, t : t + 1], size)[0]
        b = upsample_normalized(other[n, t : t + 1], size)[0]
        ssims.append(ssim(a, b))
    return rhos, ssims


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return float("nan"), float("nan")
    return float(np.mean(finite)), float(np.std(finite))


def sanity_check(
    backend: Backend,
    images: torch.Tensor,
    texts: Texts,
    methods: Sequence[str],
    options: dict[str, dict[str, Any]] | None = None,
    pairs: torch.Tensor | None = None,
    batch_size: int = 8,
    seed: int = 0,
    threshold: float = FLAG_THRESHOLD,
    on_stage: Callable[[str], None] | None = None,
) -> SanityResult:
    """The cascading randomisation test of `methods` on preprocessed `images` `[N, 3, H, W]`.

    pairs: bool `[N, T]`, the (image, prompt) pairs compared (default: all).
    seed: seed of the re-drawn weights.
    threshold: a method is flagged when its mean rank correlation with the original maps,
        after the whole tower is random, is still at least this.
    """
    if batch_size < 1:
        raise ClipvizError(f"`batch_size` {batch_size} must be at least 1")
    check_methods(backend, methods)
    options = options or {}
    pairs = (
        torch.ones(len(images), len(texts.prompts), dtype=torch.bool) if pairs is None else pairs
    )
    if not bool(pairs.any()):
        raise ClipvizError("no (image, prompt) pair to compare")
    size = backend.input_size
    original = {
        m: method_maps(backend, images, texts, m, options.get(m, {}), batch_size) for m in methods
    }
    twin, cascade = randomizable_copy(backend)
    generator = torch.Generator().manual_seed(seed)
    scores: dict[str, dict[str, list[Any]]] = {
        m: {"spearman": [], "spearman_std": [], "ssim": [], "ssim_std": [], "undefined": []}
        for m in methods
    }
    for stage, parts in cascade:
        redraw(parts, generator)
        for m in methods:
            maps = method_maps(twin, images, texts, m, options.get(m, {}), batch_size)
            rhos, ssims = compare_maps(original[m], maps, pairs, size)
            for key, values in (("spearman", rhos), ("ssim", ssims)):
                mean, std = _mean_std(values)
                scores[m][key].append(mean)
                scores[m][f"{key}_std"].append(std)
            scores[m]["undefined"].append(sum(math.isnan(r) for r in rhos))
        if on_stage:
            on_stage(stage)
    return SanityResult(
        stages=[name for name, _ in cascade],
        pairs=int(pairs.sum()),
        threshold=threshold,
        methods={
            m: CascadeScores(**s, flagged=bool(s["spearman"][-1] >= threshold))  # NaN: not flagged
            for m, s in scores.items()
        },
    )


def sanity_summary(
    result: SanityResult, model: dict[str, Any], info: dict[str, Any]
) -> dict[str, Any]:
    """What `sanity.json` holds (and `--json` prints): provenance, the model's identity,
    `info` about the inputs, and the result, with an undefined mean (NaN) as null."""
    return _nan_as_null({**provenance(), "model": model, **info, **asdict(result)})


def _nan_as_null(value: Any) -> Any:
    """NaN is not JSON: write it as null, as the eval results do."""
    if isinstance(value, dict):
        return {k: _nan_as_null(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_nan_as_null(v) for v in value]
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def write_sanity(
    out: Path, result: SanityResult, backend: Backend, info: dict[str, Any]
) -> dict[str, Any]:
    """`sanity.json` and the cascade plot `sanity.png` in `out`; returns what the JSON holds."""
    out.mkdir(parents=True, exist_ok=True)
    summary = sanity_summary(result, backend.identity, info)
    write_json_atomic(out / "sanity.json", summary)
    plot_cascade(out / "sanity.png", result)
    return summary


def lower_limit(result: SanityResult, key: str) -> float:
    """The lower end of a cascade plot's axis: −0.2 for rank correlations (0 for SSIM), or
    below the lowest value drawn, so that no point falls off the chart."""
    floor = -0.2 if key == "spearman" else 0.0
    drawn = [v for s in result.methods.values() for v in getattr(s, key) if v is not None]
    return min([floor, *(v - 0.05 for v in drawn if math.isfinite(v))])


def plot_cascade(path: Path, result: SanityResult) -> None:
    """Rank correlation and SSIM against the layers randomised, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    x = list(range(len(result.stages) + 1))
    labels = ["original", *result.stages]
    fig, axes = plt.subplots(1, 2, figsize=(max(8.0, 0.55 * len(x) * 2), 4.2), sharex=True)
    palette = plt.get_cmap("tab10" if len(result.methods) <= 10 else "tab20")
    for ax, key, title in ((axes[0], "spearman", "Spearman rank correlation"),
                           (axes[1], "ssim", "SSIM")):  # fmt: skip
        for k, (name, s) in enumerate(result.methods.items()):
            values = [1.0, *getattr(s, key)]
            style = "--" if s.flagged else "-"
            ax.plot(x, values, style, marker="o", markersize=3, label=name, color=palette(k))
        ax.set_title(title)
        ax.set_ylim(lower_limit(result, key), 1.05)
        ax.axhline(0.0, color="0.7", linewidth=0.8)
        ax.set_xticks(x, labels, rotation=60, ha="right", fontsize=8)
        ax.grid(alpha=0.3)
    axes[0].axhline(result.threshold, color="tab:red", linewidth=0.8, linestyle=":")
    axes[1].legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.suptitle("Cascading randomisation of the image tower (dashed: flagged)", fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        fig.savefig(f, format="png", dpi=120)
    plt.close(fig)
