"""The protocol's steps after the model: merge the windows, upsample, refine, classify.

Per image (as the authors' segmentors compute it): every window's cosine maps are upsampled to the window's pixels and
averaged where windows overlap; the average is upsampled to the original size; PAMR may refine
it; then `softmax(logit_scale · cos)` over every name, the best name of each class, the area
threshold, the argmax, and pixels whose best probability stays under `prob_thd` go to class 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import ClipvizError
from .pamr import check_pamr
from .windows import Window, check_window


@dataclass(frozen=True)
class Protocol:
    """The settings of the protocol (the README's segmentation section; presets.json per method).

    short_side: `Resize(scale=(2048, S), keep_ratio=True)`'s S (0: no resize).
    window, stride: the sliding window in resized pixels (window 0: the whole image at once).
    logit_scale: L of `softmax(L · cos)` over all names.
    prob_thd: pixels whose best class probability is below it go to class 0.
    area_thd: foreground classes whose argmax pixels are at most this share of all foreground
        pixels are dropped (SCLIP's VOC21 setting; 0: off).
    pamr_steps, pamr_dilations: PAMR on the cosine maps at the original size (0 steps: off).
    pad: each window is zero-padded, centred, to a multiple of this many pixels before the
        model and its maps cut back (ProxyCLIP's 56; 0: windows cut to whole patches instead).
    """

    short_side: int = 336
    window: int = 224
    stride: int = 112
    logit_scale: float = 40.0
    prob_thd: float = 0.0
    area_thd: float = 0.0
    pamr_steps: int = 0
    pamr_dilations: tuple[int, ...] = (8, 16)
    pad: int = 0

    def check(self) -> None:
        """Refuse settings the protocol cannot use (one line each)."""
        if self.short_side < 0:
            raise ClipvizError(f"`short_side` {self.short_side} must be 0 (no resize) or more")
        check_window(self.window, self.stride)
        if not self.logit_scale > 0 or self.logit_scale == float("inf"):
            raise ClipvizError(f"`logit_scale` {self.logit_scale} must be a positive number")
        if not 0 <= self.prob_thd <= 1:
            raise ClipvizError(f"`prob_thd` {self.prob_thd} must be between 0 and 1")
        if not 0 <= self.area_thd < 1:
            raise ClipvizError(f"`area_thd` {self.area_thd} must be at least 0 and below 1")
        check_pamr(self.pamr_steps, self.pamr_dilations)
        if not 0 <= self.pad <= 1024:
            raise ClipvizError(f"`pad` {self.pad} must be 0 (none) or a multiple up to 1024")


def upsample(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Maps `[Q, h, w]` or `[N, Q, h, w]` resized bilinearly (`align_corners=False`) to `size`."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps.float()
    batch = maps if maps.dim() == 4 else maps[None]
    out = F.interpolate(batch.float(), size=size, mode="bilinear", align_corners=False)
    return out if maps.dim() == 4 else out[0]


def merge_windows(
    window_maps: Sequence[torch.Tensor], windows: Sequence[Window], size: tuple[int, int]
) -> torch.Tensor:
    """The average `[Q, H, W]` over `size` of per-window maps `[Q, h, w]` (each at its model
    grid): each upsampled to its window's pixels, summed, divided by the window count."""
    canvas = window_maps[0].new_zeros((window_maps[0].shape[0], *size), dtype=torch.float32)
    count = canvas.new_zeros((1, *size))
    for maps, w in zip(window_maps, windows, strict=True):
        canvas[:, w.top : w.bottom, w.left : w.right] += upsample(maps, w.size)
        count[:, w.top : w.bottom, w.left : w.right] += 1
    if not bool((count > 0).all()):
        raise ValueError("the windows leave pixels uncovered")
    return canvas / count


def class_probabilities(
    cosines: torch.Tensor, name_class: torch.Tensor, num_classes: int, logit_scale: float
) -> torch.Tensor:
    """Class probabilities `[K, H, W]` from the cosine maps `[Q, H, W]` of every name: the
    softmax of `logit_scale · cos` over all Q names, then per class the max over its names
    (`name_class` `[Q]`: the class of each name)."""
    probs = (cosines.float() * logit_scale).softmax(dim=0)
    if cosines.shape[0] == num_classes:
        return probs  # one name per class, in class order
    classes = name_class.tolist()
    if classes == sorted(classes) and set(classes) == set(range(num_classes)):
        # a classes file's names come line by line: each class's names are one slice
        bounds = torch.searchsorted(name_class.cpu(), torch.arange(num_classes + 1)).tolist()
        out = probs.new_empty((num_classes, *probs.shape[1:]))
        for k in range(num_classes):
            torch.amax(probs[bounds[k] : bounds[k + 1]], dim=0, out=out[k])
        return out
    index = name_class.to(probs.device).view(-1, 1, 1).expand_as(probs)
    out = probs.new_zeros((num_classes, *probs.shape[1:]))
    return out.scatter_reduce_(0, index, probs, reduce="amax", include_self=True)


def area_threshold(probs: torch.Tensor, area_thd: float) -> torch.Tensor:
    """SCLIP's area threshold on class probabilities `[K, H, W]`: a foreground class (1 … K−1)
    keeps its probabilities only when its argmax pixels are more than `area_thd` of all
    foreground argmax pixels (strictly); otherwise they become 0. Class 0 is never dropped;
    `area_thd` 0 changes no label. Counts are exact integers."""
    if area_thd <= 0:
        return probs
    counts = torch.bincount(probs.argmax(dim=0).flatten(), minlength=probs.shape[0])
    foreground = counts[1:]
    dropped = (foreground <= area_thd * foreground.sum()).nonzero().flatten() + 1
    if len(dropped) == 0:
        return probs
    out = probs.clone()
    out[dropped] = 0.0
    return out


def labels_from_probabilities(probs: torch.Tensor, prob_thd: float) -> torch.Tensor:
    """Labels `[H, W]` (int64): the argmax over classes, class 0 where the best probability
    is below `prob_thd`."""
    best, labels = probs.max(dim=0)  # the first class among equals, as argmax
    return labels.masked_fill_(best < prob_thd, 0)


def classify(
    cosines: torch.Tensor, name_class: torch.Tensor, num_classes: int, protocol: Protocol
) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels `[H, W]` and class probabilities `[K, H, W]` from merged cosine maps `[Q, H, W]`
    at the original size (after any PAMR)."""
    probs = class_probabilities(cosines, name_class, num_classes, protocol.logit_scale)
    probs = area_threshold(probs, protocol.area_thd)
    return labels_from_probabilities(probs, protocol.prob_thd), probs
