"""The files of one explained image: overlays and heatmaps per prompt (and method), the
comparison sheet, and `maps.npz` with the raw and upsampled maps.

Maps cover the part of the image the model saw (`crop`): with `--crop center` the centre
crop, elsewhere no data (transparent in heatmaps, the bare photo in overlays, 0 in the
upsampled maps). Rendering is done one prompt at a time, at the display size, so memory
stays bounded by one map whatever the number of prompts.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..errors import ClipvizError
from ..explanation import Explanation
from ..maps import place_in_box
from ..render import (
    blend_heatmap,
    colormap_function,
    comparison_sheet,
    npz_writer,
    prompt_slugs,
    save_heatmap,
    save_png,
)
from .decode import RENDER_MAX_SIDE, scaled_box

SHEET_CELL = 224
# files a run writes into an image's folder: a re-run removes the ones it no longer writes
OUTPUT_FILE = re.compile(r"^(.+\.(overlay|heatmap)\.png|comparison\.png|maps\.npz)$")


SAVE_KINDS = ("overlays", "heatmaps", "maps")
MAP_DTYPES = ("float32", "float16")
MIN_RENDER_SIDE = 16


@dataclass(frozen=True)
class RenderOptions:
    """How an image's outputs are written: the colormap and opacity of the overlays, which
    files (`save`: overlays — with the comparison sheet when several methods ran —,
    heatmaps, maps.npz), the long side of rendered PNGs and upsampled maps (`max_side`,
    never above the photo's own) and the type of the raw maps in maps.npz (`maps_dtype`)."""

    colormap: str = "jet"
    alpha: float = 0.5
    save: tuple[str, ...] = SAVE_KINDS
    max_side: int = RENDER_MAX_SIDE
    maps_dtype: str = "float32"

    def __post_init__(self) -> None:
        colormap_function(self.colormap)  # an unknown name is a usage error, at once
        if not 0.0 <= self.alpha <= 1.0:
            raise ClipvizError(f"`alpha` {self.alpha} is outside [0, 1]")
        unknown = [s for s in self.save if s not in SAVE_KINDS]
        if unknown or not self.save:
            raise ClipvizError(
                f"`save` {', '.join(unknown) or '(nothing)'}: choose from all, "
                f"{', '.join(SAVE_KINDS)}"
            )
        if self.maps_dtype not in MAP_DTYPES:
            raise ClipvizError(
                f"`maps_dtype` {self.maps_dtype!r}: choose from {', '.join(MAP_DTYPES)}"
            )
        if not MIN_RENDER_SIDE <= self.max_side <= RENDER_MAX_SIDE:
            raise ClipvizError(
                f"`render_size` {self.max_side} is outside {MIN_RENDER_SIDE}…{RENDER_MAX_SIDE}"
            )

    def key(self) -> dict[str, Any]:
        """What of these options changes the outputs, for a run's request key (the options
        added later only when they differ from their defaults, so older runs still match)."""
        out: dict[str, Any] = {"colormap": self.colormap, "alpha": self.alpha}
        if tuple(self.save) != SAVE_KINDS:
            out["save"] = sorted(self.save)
        if self.max_side != RENDER_MAX_SIDE:
            out["max_side"] = self.max_side
        if self.maps_dtype != "float32":
            out["maps_dtype"] = self.maps_dtype
        return out


@dataclass(frozen=True)
class Written:
    """The files of one image and, per prompt, the names of its overlay and heatmap (by
    method when several ran), so manifest, NPZ and report name the same files."""

    files: list[str]
    prompt_files: dict[str, dict[str, str]]


def write_outputs(
    folder: Path,
    image: np.ndarray,
    explanations: Sequence[Explanation],
    index: int,
    render: RenderOptions,
    crop: tuple[int, int, int, int] | None = None,
    size: tuple[int, int] | None = None,
) -> Written:
    """Write overlays, heatmaps, the comparison sheet and `maps.npz` of image `index`.

    image: the display image, uint8 `[H, W, 3]`; crop: the box (left, top, right, bottom) of
    it the model saw (default: all of it); size: the original image's (width, height).
    """
    H, W = image.shape[:2]
    crop = crop or (0, 0, W, H)
    first = explanations[0]
    slugs = prompt_slugs(first.prompts)
    several = len(explanations) > 1
    files: list[str] = []
    prompt_files: dict[str, dict[str, str]] = {p: {} for p in first.prompts}
    folder.mkdir(parents=True, exist_ok=True)
    kinds = [k for k, s in (("overlay", "overlays"), ("heatmap", "heatmaps")) if s in render.save]
    saves_maps = "maps" in render.save
    with npz_writer(folder / "maps.npz") if saves_maps else contextlib.nullcontext() as npz:
        if npz is not None:
            npz.add("prompts", np.array(first.prompts))
            npz.add("methods", np.array([e.method for e in explanations]))
            npz.add("scores", first.scores[index].numpy())
            npz.add("probs", first.probs[index].numpy())
            npz.add("size", np.array(size or (W, H)))  # (width, height) of the original image
            npz.add("render_size", np.array((W, H)))  # (width, height) of the upsampled maps
            npz.add("crop", np.array(crop))  # (left, top, right, bottom) in render pixels
        for k, exp in enumerate(explanations):
            key = "" if k == 0 else f"_{exp.method}"
            if npz is not None:
                npz.add(f"maps{key}", exp.maps[index].numpy().astype(render.maps_dtype))
                for name, values in exp.extras.items():
                    npz.add(f"{name}{key}", values[index].numpy())
                for name, names in exp.labels.items():
                    npz.add(f"{name}{key}", np.array(names))
            rows = (
                npz.rows(f"upsampled{key}", (len(exp.prompts), H, W), np.uint8)
                if npz is not None
                else contextlib.nullcontext()
            )
            with rows as row:
                for t, (prompt, slug) in enumerate(zip(exp.prompts, slugs, strict=True)):
                    norm = place_in_box(exp.maps[index, t : t + 1], crop, (H, W))[0].numpy()
                    if row is not None:
                        row(map_bytes(norm))
                    for kind in kinds:
                        name = (
                            f"{slug}.{exp.method}.{kind}.png" if several else f"{slug}.{kind}.png"
                        )
                        if kind == "overlay":
                            save_png(
                                folder / name,
                                blend_heatmap(image, norm, render.colormap, render.alpha),
                            )
                        else:
                            save_heatmap(folder / name, norm, render.colormap)
                        files.append(name)
                        prompt_files[prompt][f"{exp.method}.{kind}" if several else kind] = name
    if several and "overlays" in render.save:
        save_png(folder / "comparison.png", _sheet(image, explanations, index, crop, render))
        files.append("comparison.png")
    if saves_maps:
        files.append("maps.npz")
    _remove_stale(folder, files)
    return Written(files, prompt_files)


def map_bytes(norm: np.ndarray) -> np.ndarray:
    """A normalised map as uint8 `round(255·t)`, no data (NaN) as 0: the upsampled maps of
    `maps.npz`."""
    q = np.multiply(norm, 255.0, dtype=np.float32)
    q += 0.5
    if (missing := np.isnan(q)).any():
        q[missing] = 0.0
    return q.astype(np.uint8)


def _sheet(
    image: np.ndarray,
    explanations: Sequence[Explanation],
    index: int,
    crop: tuple[int, int, int, int],
    render: RenderOptions,
) -> np.ndarray:
    """The comparison sheet, its maps computed at the sheet's cell size."""
    H, W = image.shape[:2]
    scale = SHEET_CELL / max(H, W)
    small = (max(1, round(W * scale)), max(1, round(H * scale)))
    picture = np.asarray(Image.fromarray(image).resize(small, Image.Resampling.BILINEAR))
    box = scaled_box(crop, (W, H), small)
    maps: dict[str, Any] = {
        exp.method: place_in_box(exp.maps[index], box, (small[1], small[0])).numpy()
        for exp in explanations
    }
    first = explanations[0]
    return comparison_sheet(
        picture, maps, first.prompts, render.colormap, render.alpha, SHEET_CELL,
        scores=first.probs[index].tolist(),
    )  # fmt: skip


def _remove_stale(folder: Path, kept: Sequence[str]) -> None:
    """Remove output files an earlier run wrote here that this one did not (other prompts or
    methods), so the folder shows this run only."""
    keep = set(kept)
    for path in folder.iterdir():
        if path.is_file() and OUTPUT_FILE.match(path.name) and path.name not in keep:
            with contextlib.suppress(OSError):
                path.unlink()
