"""The protocol's labels at the photo's size, decided on the merged map's grid where they can
be, without upsampling every name's map to every pixel.

Upsampled bilinearly (`align_corners=False`), each name's cosine at an output pixel is a convex
combination of its cosines at the (up to) four grid pixels around it, with the same weights for
every name. Where those four have the same best name, that name is the best at the pixel too
(it is at least every other name at each of them, so in their combination), and its
probability `1 / Σ exp(L·cos − L·max cos)` is at least the smallest of theirs (exp is convex:
the softmax's denominator at the pixel is at most the weighted mean of theirs). Such a pixel's
label is that name's class, kept by `prob_thd` when each of the four's is. Its best
probability is also at most `1 / Σ_name min exp(L·cos − L·max cos)` over the four (the best
cosine is at most the weighted mean of theirs; a weighted mean at least their smallest), so
below `prob_thd` when that bound is, whatever its name. Only the other pixels (near a
boundary between names, near the threshold, or of a class that the area threshold drops) are
interpolated and classified one by one.

The labels equal `classify`'s over the upsampled maps, ties aside: pixels whose two best names,
or whose best probability and `prob_thd`, are within rounding of each other.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .protocol import CLASSIFY_BLOCK, Protocol, dropped_classes


def axis_weights(
    n_in: int, n_out: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Along one axis, the two source indices `i, i + 1` (`i` the first with a weight; `i`
    again at the last) and their weights `[n_out]` each of a linear resize from `n_in` to
    `n_out` (`align_corners=False`): torch's own weights, read by resizing the identity."""
    eye = torch.eye(n_in, device=device)[None]  # [1, channels, length]: channel i is source i
    weights = F.interpolate(eye, size=n_out, mode="linear", align_corners=False)[0]
    first = (weights > 0).to(torch.uint8).argmax(dim=0)  # [n_out]
    second = (first + 1).clamp_(max=n_in - 1)
    w0 = weights.gather(0, first[None])[0]
    w1 = weights.gather(0, second[None])[0].masked_fill_(second == first, 0.0)
    return first, second, w0, w1


class _Bilinear:
    """The upsampled cosines `[n, Q]` of chosen output pixels, from the grid's `[Q, h, w]`."""

    def __init__(self, maps: torch.Tensor, size: tuple[int, int]) -> None:
        q, h, w = maps.shape
        self.width = size[1]
        self.grid = maps.permute(1, 2, 0).reshape(h * w, q).float()  # [h·w, Q], a copy
        y0, y1, self.a0, self.a1 = axis_weights(h, size[0], maps.device)
        self.x0, self.x1, self.b0, self.b1 = axis_weights(w, size[1], maps.device)
        self.r0, self.r1 = y0 * w, y1 * w

    def corners(self, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The grid indices `[n]` of the four corners of output `pixels` (flat indices)."""
        r, c = pixels // self.width, pixels % self.width
        r0, r1, x0, x1 = self.r0[r], self.r1[r], self.x0[c], self.x1[c]
        return r0 + x0, r0 + x1, r1 + x0, r1 + x1

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        r, c = pixels // self.width, pixels % self.width
        c00, c01, c10, c11 = (self.grid.index_select(0, i) for i in self.corners(pixels))
        across = self.b1[c, None]
        above, below = c00.lerp_(c01, across), c10.lerp_(c11, across)
        return above.lerp_(below, self.a1[r, None])


def best_names(
    rows: torch.Tensor, scale: float, keep_terms: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Of cosines `[n, Q]`: each row's best cosine, its name (the first among equals), the
    softmax's denominator `Σ exp(L·cos − L·max cos)` (`[n]` each) and, when `keep_terms`,
    its terms `[n, Q]`."""
    top, name = rows.max(dim=1)
    terms = (rows * scale).sub_((top * scale)[:, None]).exp_()
    return top, name, terms.sum(dim=1), terms if keep_terms else None


def _grid_pass(
    grid: torch.Tensor, scale: float, bound: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Over the grid's cosines `[h, w, Q]`, in blocks of whole rows: each grid pixel's best
    name and softmax denominator (`[h·w]` each) and, when `bound`, each cell's
    `Σ_name min exp(L·cos − L·max cos)` over its four corners (`[h, w]`; see `_cell`)."""
    h, w, q = grid.shape
    name = torch.empty(h * w, dtype=torch.int64, device=grid.device)
    total = torch.empty(h * w, device=grid.device)
    least = torch.empty((h, w), device=grid.device) if bound else None
    rows = max(1, _block(grid.device) // w)
    for top in range(0, h, rows):
        end = min(top + rows, h)
        below = min(end + 1, h)  # the next block's first row: the corners below this one's last
        _, found, denominator, terms = best_names(grid[top:below].reshape(-1, q), scale, bound)
        name[top * w : end * w], total[top * w : end * w] = (
            found[: (end - top) * w], denominator[: (end - top) * w])  # fmt: skip
        if least is not None and terms is not None:
            terms = terms.view(below - top, w, q)
            across = torch.cat([torch.minimum(terms[:, :-1], terms[:, 1:]), terms[:, -1:]], 1)
            cells = torch.minimum(across[:-1], across[1:])
            if below == end:  # the last row: its cells have no row below
                cells = torch.cat([cells, across[-1:]])
            least[top:end] = cells.sum(dim=-1)
    return name, total, least


def _cell(grid: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Of values `[h, w, ...]` at the grid pixels: at each grid pixel, its value and those of
    the pixels right, below and below right (the last row and column repeated): the corners
    of every output pixel whose upper left corner it is."""
    grid = torch.cat([grid, grid[-1:]], dim=0)
    grid = torch.cat([grid, grid[:, -1:]], dim=1)
    return grid[:-1, :-1], grid[:-1, 1:], grid[1:, :-1], grid[1:, 1:]


def grid_labels(
    maps: torch.Tensor,
    size: tuple[int, int],
    name_class: torch.Tensor,
    num_classes: int,
    protocol: Protocol,
) -> torch.Tensor:
    """Labels `[H, W]` (int64) at `size` of merged cosine maps `[Q, h, w]`: those of
    `classify(upsample(maps, size), …)` (ties aside), the steps after the upsampling on the
    grid and on the pixels it leaves undecided (see the module)."""
    scale, thd, device = protocol.logit_scale, protocol.prob_thd, maps.device
    q, h, w = maps.shape
    name_class = name_class.to(device)
    up = _Bilinear(maps, size)
    name, total, least = _grid_pass(up.grid.view(h, w, q), scale, bound=thd > 0)
    corners = _cell(name.view(h, w))
    agree = (corners[0] == corners[1]) & (corners[0] == corners[2]) & (corners[0] == corners[3])
    high, low = agree, torch.zeros_like(agree)  # the best probability surely >= / < prob_thd
    if least is not None:
        best = functools.reduce(torch.minimum, _cell(total.reciprocal().view(h, w)))
        high = agree & (best >= thd)
        low = least.reciprocal() < thd
    # each output pixel's upper left corner, and what its cell decides
    cell = (up.r0[:, None] + up.x0[None]).flatten()
    names, agree, high, low = (t.flatten().index_select(0, cell) for t in (name, agree, high, low))
    undecided = ~high & ~low
    if protocol.area_thd > 0:  # every pixel's best class counts towards the area threshold
        undecided |= ~agree
    exact = undecided.nonzero().flatten()
    for b in _blocks(len(exact), device):
        pixels = exact[b]
        _, found, denominator, _ = best_names(up(pixels), scale)
        names[pixels] = found
        low[pixels] = denominator.reciprocal() < thd
    labels = name_class[names]
    dropped = dropped_classes(labels, num_classes, protocol.area_thd)
    if len(dropped):  # their pixels take the best name among the classes kept
        moved = (torch.isin(labels, dropped) & ~low).nonzero().flatten()
        kept = (~torch.isin(name_class, dropped)).nonzero().flatten()
        for b in _blocks(len(moved), device):
            pixels = moved[b]
            rows = up(pixels)
            top, _, denominator, _ = best_names(rows, scale)
            second, which = rows.index_select(1, kept).max(dim=1)
            labels[pixels] = name_class[kept[which]]
            low[pixels] = (second * scale - top * scale).exp_() / denominator < thd
    return labels.masked_fill_(low, 0).view(size)


def _block(device: torch.device) -> int:
    """Rows taken at a time: `CLASSIFY_BLOCK` on a CPU, 64 times more on an accelerator."""
    return CLASSIFY_BLOCK if device.type == "cpu" else 64 * CLASSIFY_BLOCK


def _blocks(n: int, device: torch.device) -> list[slice]:
    """`n` rows in slices of `_block(device)`."""
    step = _block(device)
    return [slice(start, start + step) for start in range(0, n, step)]
