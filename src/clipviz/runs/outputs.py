"""The files of one explained image: overlays and heatmaps per prompt (and method), the
comparison sheet, and `maps.npz` with the raw and upsampled maps."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..explanation import Explanation
from ..maps import upsample_normalized
from ..render import colorize, comparison_sheet, overlay, prompt_slugs, save_npz, save_png


@dataclass(frozen=True)
class RenderOptions:
    colormap: str = "jet"
    alpha: float = 0.5


def write_outputs(
    folder: Path,
    image: np.ndarray,
    explanations: Sequence[Explanation],
    index: int,
    render: RenderOptions,
) -> list[str]:
    """Write overlays, heatmaps and `maps.npz` of image `index`; returns the file names."""
    size = (image.shape[0], image.shape[1])
    first = explanations[0]
    slugs = prompt_slugs(first.prompts)
    files: list[str] = []
    arrays: dict[str, np.ndarray] = {
        "prompts": np.array(first.prompts),
        "methods": np.array([e.method for e in explanations]),
        "scores": first.scores[index].numpy(),
        "probs": first.probs[index].numpy(),
        "size": np.array(size),
    }
    upsampled: dict[str, np.ndarray] = {}
    for k, exp in enumerate(explanations):
        up = upsample_normalized(exp.maps[index], size).numpy()  # [T, H, W] in [0, 1]
        upsampled[exp.method] = up
        suffix = "" if len(explanations) == 1 else f".{exp.method}"
        for slug, norm in zip(slugs, up, strict=True):
            for kind, rgb in (
                ("overlay", overlay(image, norm, render.colormap, render.alpha)),
                ("heatmap", colorize(norm, render.colormap)),
            ):
                name = f"{slug}{suffix}.{kind}.png"
                save_png(folder / name, rgb)
                files.append(name)
        key = "" if k == 0 else f"_{exp.method}"
        arrays[f"maps{key}"] = exp.maps[index].numpy()
        arrays[f"upsampled{key}"] = (up * 255.0 + 0.5).astype(np.uint8)
    if len(explanations) > 1:
        sheet = comparison_sheet(image, upsampled, first.prompts, render.colormap, render.alpha)
        save_png(folder / "comparison.png", sheet)
        files.append("comparison.png")
    save_npz(folder / "maps.npz", **arrays)
    files.append("maps.npz")
    return files
