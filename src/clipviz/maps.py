"""Raw maps to displayable ones: min-max normalisation and upsampling, once for every method."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F


def normalize_map(m: npt.ArrayLike) -> np.ndarray:
    """Min-max normalise a map to [0, 1] (float64); a constant map becomes all zeros."""
    a = np.asarray(m, dtype=np.float64)
    lo, hi = a.min(), a.max()
    if hi <= lo:
        return np.zeros_like(a)
    return (a - lo) / (hi - lo)


def normalize_maps(maps: torch.Tensor) -> torch.Tensor:
    """Min-max each map `[..., h, w]` over its positions to [0, 1] (a flat map becomes 0);
    the tensor counterpart of `normalize_map`, in the input's dtype."""
    flat = maps.flatten(-2)
    lo = flat.min(dim=-1, keepdim=True).values
    hi = flat.max(dim=-1, keepdim=True).values
    return ((flat - lo) / (hi - lo).clamp_min(1e-12)).view_as(maps)


def upsample_normalized(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """`[T, h, w]` raw maps -> `[T, H, W]` normalised maps at the image's size."""
    norm = normalize_maps(maps.float())
    return F.interpolate(norm[None], size=size, mode="bilinear", align_corners=False)[0]


def place_in_box(
    maps: torch.Tensor, box: tuple[int, int, int, int], size: tuple[int, int]
) -> torch.Tensor:
    """`[T, h, w]` raw maps of the part `box` (`left, top, right, bottom`) of an image of
    `size` (H, W) the model saw -> `[T, H, W]` normalised maps, NaN outside the box (no data)."""
    left, top, right, bottom = box
    if (left, top, right, bottom) == (0, 0, size[1], size[0]):
        return upsample_normalized(maps, size)
    full = torch.full((maps.shape[0], *size), float("nan"))
    if right > left and bottom > top:
        full[:, top:bottom, left:right] = upsample_normalized(maps, (bottom - top, right - left))
    return full
