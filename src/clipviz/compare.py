"""How alike two saliency maps are: Spearman rank correlation and SSIM (the two measures of
the model-randomisation sanity check, Adebayo et al., NeurIPS 2018)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

SSIM_WINDOW, SSIM_SIGMA = 11, 1.5  # Wang et al. (2004)'s Gaussian window
SSIM_K1, SSIM_K2 = 0.01, 0.03


def average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1 … n of a 1-D array, ties given the mean of the ranks they span."""
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = np.arange(1, len(values) + 1)
    sorted_values = values[order]
    starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
    ends = np.r_[starts[1:], len(values)]
    for s, e in zip(starts, ends, strict=True):
        if e - s > 1:
            ranks[order[s:e]] = (s + 1 + e) / 2
    return ranks


def rank_correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's ρ between two maps (any shape, the same number of positions); NaN when
    either map is constant (no ranking to compare)."""
    ra = average_ranks(a.detach().double().flatten().cpu().numpy())
    rb = average_ranks(b.detach().double().flatten().cpu().numpy())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = np.sqrt((ra**2).sum() * (rb**2).sum())
    return float((ra * rb).sum() / denominator) if denominator > 0 else float("nan")


def _gaussian_window(device: torch.device) -> torch.Tensor:
    x = torch.arange(SSIM_WINDOW, dtype=torch.float64, device=device) - SSIM_WINDOW // 2
    g = torch.exp(-(x**2) / (2 * SSIM_SIGMA**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]  # [1, 1, k, k]


def ssim(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean structural similarity of two maps `[H, W]` with values in [0, 1] (data range 1),
    over the positions where the 11×11 Gaussian window fits (no padding)."""
    if min(a.shape[-2:]) < SSIM_WINDOW:
        raise ValueError(f"ssim needs maps of at least {SSIM_WINDOW}x{SSIM_WINDOW} positions")
    x = a.detach().double()[None, None]
    y = b.detach().double()[None, None].to(x.device)
    w = _gaussian_window(x.device)
    mx, my = F.conv2d(x, w), F.conv2d(y, w)
    sxx = F.conv2d(x * x, w) - mx**2
    syy = F.conv2d(y * y, w) - my**2
    sxy = F.conv2d(x * y, w) - mx * my
    c1, c2 = SSIM_K1**2, SSIM_K2**2
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx**2 + my**2 + c1) * (sxx + syy + c2))
    return float(s.mean())
