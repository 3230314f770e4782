"""PAMR, pixel-adaptive mask refinement (Araslanov & Roth, CVPR 2020), as the segmentors of
SCLIP and NACLIP apply it to cosine maps.

Every pixel's scores become an affinity-weighted mean of its neighbours' scores, the affinity
coming from colour differences in the guide image, repeated `steps` times.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import ClipvizError

# the 8 neighbours of a 3×3 window (row, column offsets), in the reference's kernel order
NEIGHBOURS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))
WINDOW = NEIGHBOURS[:4] + ((0, 0),) + NEIGHBOURS[4:]  # the 3×3 window, centre included


def check_pamr(steps: int, dilations: Sequence[int]) -> None:
    if steps < 0:
        raise ClipvizError(f"`pamr_steps` {steps} must be 0 (no PAMR) or more (e.g. 10)")
    if steps and (not dilations or any(d < 1 for d in dilations)):
        raise ClipvizError(
            f"`pamr_dilations` {list(dilations)} must be one or more positive distances (e.g. 8,16)"
        )


def _shifted(x: torch.Tensor, d: int, offsets: Sequence[tuple[int, int]]) -> list[torch.Tensor]:
    """`x` `[B, C, H, W]` read at each offset times `d`, the border replicated."""
    H, W = x.shape[-2:]
    padded = torch.nn.functional.pad(x, (d, d, d, d), mode="replicate")
    return [padded[..., d + dy * d : d + dy * d + H, d + dx * d : d + dx * d + W]
            for dy, dx in offsets]  # fmt: skip


def pamr_affinity(image: torch.Tensor, dilations: Sequence[int]) -> torch.Tensor:
    """Neighbour weights `[B, P, H, W]` (P = 8 per dilation, summing to 1 at each pixel) from
    the guide `image` `[B, K, H, W]`.

    Per colour channel k: `a_p = −|x_p − x| / (1e-8 + 0.1 σ)`, σ the unbiased standard
    deviation of the 9 values of every dilation's 3×3 window (all dilations pooled, centre
    once per dilation); then the mean over the channels and a softmax over all P neighbours.
    """
    windows = [v for d in dilations for v in _shifted(image, d, WINDOW)]
    std = torch.stack(windows, dim=2).std(dim=2)  # [B, K, H, W]
    differences = torch.stack(
        [(image - v).abs() for d in dilations for v in _shifted(image, d, NEIGHBOURS)], dim=2
    )  # [B, K, P, H, W]
    logits = -differences / (1e-8 + 0.1 * std[:, :, None])
    return logits.mean(dim=1).softmax(dim=1)


def pamr(
    image: torch.Tensor, scores: torch.Tensor, steps: int, dilations: Sequence[int]
) -> torch.Tensor:
    """Scores `[B, C, H, W]` refined `steps` times, guided by `image` `[B, K, H, W]` of the
    same size: each pass replaces a pixel's scores by the affinity-weighted sum of its P
    neighbours' (the pixel itself not among them). Memory stays a few times `C·H·W`: the
    neighbours are summed one at a time, never held together."""
    check_pamr(steps, dilations)
    if image.shape[-2:] != scores.shape[-2:]:
        raise ValueError(f"guide {list(image.shape)} and scores {list(scores.shape)} differ")
    if steps == 0:
        return scores
    affinity = pamr_affinity(image.float(), dilations)  # [B, P, H, W]
    scores = scores.float()
    for _ in range(steps):
        refined = torch.zeros_like(scores)
        p = 0
        for d in dilations:
            for neighbour in _shifted(scores, d, NEIGHBOURS):
                refined += affinity[:, p : p + 1] * neighbour
                p += 1
        scores = refined
    return scores
