"""The protocol's steps after the model: merge the windows, upsample, refine, classify.

Per image (as the authors' segmentors compute it): every window's cosine maps are upsampled to the window's pixels and
averaged where windows overlap; the average is upsampled to the original size; PAMR may refine
it; then `softmax(logit_scale · cos)` over every name, the best name of each class, the area
threshold, the argmax, and pixels whose best probability stays under `prob_thd` go to class 0.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import ClipvizError
from .pamr import check_pamr
from .windows import Window, check_window


@dataclass(frozen=True)
class Protocol:
    """The settings of the protocol (docs/segmentation.md; presets.json per method).

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


class Scratch:
    """Float buffers that the steps after the model reuse from one image to the next. A
    tensor of a photo's size taken fresh each time costs its page faults each time (the
    allocator hands blocks that large back to the system): on a CPU, more than half of the
    upsampling's time. A buffer is kept while the next image needs between a quarter of it
    and all of it, so memory stays at what the largest recent image needed anyway."""

    def __init__(self) -> None:
        self._held: dict[str, torch.Tensor] = {}

    def take(self, name: str, shape: Sequence[int], device: torch.device) -> torch.Tensor:
        """An uninitialised float32 tensor of `shape`, the same memory as the last `name`
        when it fits (what it held before is overwritten)."""
        n = math.prod(shape)
        held = self._held.get(name)
        if held is None or held.device != device or not n <= held.numel() <= 4 * n:
            held = self._held[name] = torch.empty(n, dtype=torch.float32, device=device)
        return held[:n].view(*shape)


def upsample(
    maps: torch.Tensor, size: tuple[int, int], out: torch.Tensor | None = None
) -> torch.Tensor:
    """Maps `[Q, h, w]` or `[N, Q, h, w]` resized bilinearly (`align_corners=False`) to `size`
    (into `out`, contiguous, of the result's shape, when given)."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps.float() if out is None else out.copy_(maps)
    batch = maps if maps.dim() == 4 else maps[None]
    if out is None:
        resized = F.interpolate(batch.float(), size=size, mode="bilinear", align_corners=False)
        return resized if maps.dim() == 4 else resized[0]
    # F.interpolate's own kernel and arguments (no scale factors: in/out sizes), into `out`
    target = out if maps.dim() == 4 else out[None]
    torch.ops.aten.upsample_bilinear2d.out(batch.float(), list(size), False, None, None,
                                           out=target)  # fmt: skip
    return out


def merge_windows(
    window_maps: Sequence[torch.Tensor],
    windows: Sequence[Window],
    size: tuple[int, int],
    scratch: Scratch | None = None,
) -> torch.Tensor:
    """The average `[Q, H, W]` over `size` of per-window maps `[Q, h, w]` (each at its model
    grid): each upsampled to its window's pixels, summed, divided by the window count (in
    `scratch`'s buffers when given)."""
    device, q = window_maps[0].device, window_maps[0].shape[0]
    if scratch is None:
        canvas = torch.zeros((q, *size), device=device)
    else:
        canvas = scratch.take("canvas", (q, *size), device).zero_()
    count = canvas.new_zeros((1, *size))
    alike: dict[tuple[tuple[int, ...], tuple[int, int]], list[int]] = defaultdict(list)
    for i, (maps, w) in enumerate(zip(window_maps, windows, strict=True)):
        alike[(tuple(maps.shape), w.size)].append(i)
    for (_, window), group in alike.items():
        # the windows of one size resized in one call, as contiguous maps (a method's maps
        # may come channels last, whose resize and sums into the canvas take 3x the time)
        stacked = torch.stack([window_maps[i] for i in group])
        out = None
        if scratch is not None:
            out = scratch.take("windows", (*stacked.shape[:2], *window), device)
        resized = upsample(stacked, window, out)
        for i, maps in zip(group, resized, strict=True):
            w = windows[i]
            canvas[:, w.top : w.bottom, w.left : w.right] += maps
            count[:, w.top : w.bottom, w.left : w.right] += 1
    if not bool((count > 0).all()):
        raise ValueError("the windows leave pixels uncovered")
    return canvas.div_(count)


# pixels classified at a time on a CPU: the memory of the softmax grows with names times this,
# not with names times pixels; small enough that the allocator reuses a block's temporaries
# (VOC21's 56 names: 3.7 MB) instead of taking fresh pages from the system for each, whose
# page faults made blocks of 2^18 pixels take 1.7x the time of these on 2 cores
CLASSIFY_BLOCK = 16384


@dataclass(frozen=True)
class NameGroups:
    """Which names each class takes the best of: each class's first name `[K]` and the classes
    with more names, as row slices where their names are consecutive (a classes file's lines).
    """

    first: torch.Tensor
    more: tuple[tuple[int, slice | torch.Tensor], ...]
    identity: bool  # one name per class, in class order

    @classmethod
    def of(cls, name_class: torch.Tensor, num_classes: int) -> NameGroups | None:
        """The groups of `name_class` `[Q]` (the class of each name); None when a class has no
        name."""
        rows: list[list[int]] = [[] for _ in range(num_classes)]
        for name, k in enumerate(name_class.tolist()):
            rows[k].append(name)
        if not all(rows):
            return None
        device = name_class.device
        more = tuple(
            (
                k,
                slice(r[0], r[-1] + 1)
                if r[-1] - r[0] == len(r) - 1
                else torch.tensor(r, device=device),
            )
            for k, r in enumerate(rows)
            if len(r) > 1
        )
        identity = all(r == [k] for k, r in enumerate(rows))
        return cls(torch.tensor([r[0] for r in rows], device=device), more, identity)

    def best(self, probs: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Per class the max over its names' rows of `probs` `[Q, ...]`: `[K, ...]` (in `out`)."""
        if self.identity:
            return probs if out is None else out.copy_(probs)
        firsts = probs.index_select(0, self.first)
        out = firsts if out is None else out.copy_(firsts)
        for k, rows in self.more:
            torch.amax(probs[rows], dim=0, out=out[k])
        return out


def class_probabilities(
    cosines: torch.Tensor, name_class: torch.Tensor, num_classes: int, logit_scale: float
) -> torch.Tensor:
    """Class probabilities `[K, H, W]` from the cosine maps `[Q, H, W]` of every name: the
    softmax of `logit_scale · cos` over all Q names, then per class the max over its names
    (`name_class` `[Q]`: the class of each name; a class without a name gets 0)."""
    probs = (cosines.float() * logit_scale).softmax(dim=0)
    groups = NameGroups.of(name_class, num_classes)
    if groups is not None:
        return groups.best(probs)
    index = name_class.to(probs.device).view(-1, *[1] * (probs.dim() - 1)).expand_as(probs)
    out = probs.new_zeros((num_classes, *probs.shape[1:]))
    return out.scatter_reduce_(0, index, probs, reduce="amax", include_self=True)


def dropped_classes(labels: torch.Tensor, num_classes: int, area_thd: float) -> torch.Tensor:
    """SCLIP's area threshold: the foreground classes (1 … K−1) whose pixels among `labels`
    (the argmax) are at most `area_thd` of all foreground pixels (strictly more keeps a class;
    counts are exact integers); none when `area_thd` is 0."""
    if area_thd <= 0:
        return labels.new_zeros(0)
    foreground = torch.bincount(labels.flatten(), minlength=num_classes)[1:]
    return (foreground <= area_thd * foreground.sum()).nonzero().flatten() + 1


def area_threshold(probs: torch.Tensor, area_thd: float) -> torch.Tensor:
    """SCLIP's area threshold on class probabilities `[K, H, W]`: a foreground class (1 … K−1)
    keeps its probabilities only when its argmax pixels are more than `area_thd` of all
    foreground argmax pixels (strictly); otherwise they become 0. Class 0 is never dropped;
    `area_thd` 0 changes no label."""
    if area_thd <= 0:
        return probs
    dropped = dropped_classes(probs.max(dim=0).indices, probs.shape[0], area_thd)
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
    at the original size (after any PAMR): `class_probabilities`, `area_threshold` and
    `labels_from_probabilities` in one, on blocks of `CLASSIFY_BLOCK` pixels on a CPU (each
    pixel's numbers are computed alone: the same as over the whole image on one thread, and
    within the last bit on several)."""
    groups = NameGroups.of(name_class, num_classes)
    q, h, w = cosines.shape
    if groups is None:
        probs = class_probabilities(cosines, name_class, num_classes, protocol.logit_scale)
        probs = area_threshold(probs, protocol.area_thd)
        return labels_from_probabilities(probs, protocol.prob_thd), probs
    flat = cosines.reshape(q, h * w)  # [Q, P]
    probs = flat.new_empty((num_classes, h * w), dtype=torch.float32)
    best = probs.new_empty(h * w)
    labels = torch.empty(h * w, dtype=torch.int64, device=probs.device)
    step = CLASSIFY_BLOCK if probs.device.type == "cpu" else h * w
    for start in range(0, h * w, step):
        cols = slice(start, start + step)
        block = (flat[:, cols].float() * protocol.logit_scale).softmax(dim=0)
        groups.best(block, out=probs[:, cols])
        torch.max(probs[:, cols], dim=0, out=(best[cols], labels[cols]))
    dropped = dropped_classes(labels, num_classes, protocol.area_thd)
    if len(dropped):
        probs[dropped] = 0.0
        torch.max(probs, dim=0, out=(best, labels))  # the first class among equals, as argmax
    labels.masked_fill_(best < protocol.prob_thd, 0)
    return labels.view(h, w), probs.view(num_classes, h, w)
