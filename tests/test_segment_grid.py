"""Labels decided on the merged map's grid: the same labels as upsampling every name's map to
every pixel and classifying it, ties aside, with most pixels never interpolated."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from clipviz.segment import Protocol
from clipviz.segment import grid_labels as grid
from clipviz.segment.protocol import classify, dropped_classes, upsample


@pytest.mark.parametrize(("n_in", "n_out"), [(1, 5), (7, 7), (9, 4), (336, 768), (17, 100)])
def test_axis_weights_are_torchs_linear_resize(n_in, n_out):
    x = torch.rand(n_in, generator=torch.Generator().manual_seed(n_in))
    i0, i1, w0, w1 = grid.axis_weights(n_in, n_out, x.device)
    expected = F.interpolate(x[None, None], size=n_out, mode="linear", align_corners=False)[0, 0]
    torch.testing.assert_close(x[i0] * w0 + x[i1] * w1, expected, rtol=0, atol=1e-6)
    assert set((i1 - i0).tolist()) <= {0, 1} and bool((w0 > 0).all())
    torch.testing.assert_close(w0 + w1, torch.ones(n_out), rtol=0, atol=1e-6)


@pytest.mark.parametrize("size", [(31, 20), (4, 6), (9, 13)])  # up, down, the same
def test_bilinear_at_chosen_pixels_equals_upsampling(size):
    maps = torch.rand((5, 9, 13), generator=torch.Generator().manual_seed(0))
    pixels = torch.randperm(size[0] * size[1], generator=torch.Generator().manual_seed(1))[:17]
    expected = upsample(maps, size).flatten(1)[:, pixels].T
    torch.testing.assert_close(grid._Bilinear(maps, size)(pixels), expected, rtol=0, atol=1e-6)


def smooth_cosines(names: int, h: int, w: int, seed: int) -> torch.Tensor:
    """Cosines `[names, h, w]` as a method's merged maps look: smooth, a little noise, and
    one name (3) winning a small patch only."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand((1, names, 4, 5), generator=g) * 0.1 + 0.2
    maps = F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False)[0]
    maps += torch.rand((names, h, w), generator=g) * 0.004
    maps[3] -= 0.05
    maps[3, 2:4, 3:5] += 0.2
    return maps


PROTOCOLS = [
    Protocol(logit_scale=40.0),
    Protocol(logit_scale=65.0, prob_thd=0.3),
    Protocol(logit_scale=40.0, area_thd=0.05),
    Protocol(logit_scale=65.0, prob_thd=0.2, area_thd=0.1),
    Protocol(logit_scale=200.0, prob_thd=0.9),
]


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("order", ["lines", "shuffled"])
@pytest.mark.parametrize("size", [(95, 131), (20, 27), (24, 34)])  # up, down, the grid's
def test_labels_equal_classifying_the_upsampled_maps(protocol, order, size, monkeypatch):
    name_class = torch.tensor([0, 0, 1, 2, 3, 3, 3, 4])
    if order == "shuffled":
        name_class = name_class[torch.tensor([5, 0, 3, 7, 1, 6, 2, 4])]
    maps = smooth_cosines(len(name_class), 24, 34, seed=len(PROTOCOLS) + size[0])
    interpolated = []
    monkeypatch.setattr(grid._Bilinear, "__call__", spy(interpolated))
    labels = grid.grid_labels(maps, size, name_class, 5, protocol)
    expected, probs = classify(upsample(maps, size), name_class, 5, protocol)
    top2 = probs.topk(2, dim=0).values
    clear = ((top2[0] - top2[1]) > 1e-5) & ((top2[0] - protocol.prob_thd).abs() > 1e-5)
    assert clear.float().mean() > 0.99
    assert torch.equal(labels[clear], expected[clear])
    assert len(expected.unique()) > 1  # not a flat answer
    if protocol.prob_thd == 0:  # only pixels between two names' regions are interpolated
        # (again when the area threshold drops their class)
        assert sum(interpolated) < 0.35 * size[0] * size[1]


def spy(counts: list[int]):
    interpolate = grid._Bilinear.__call__

    def counted(self, pixels):
        counts.append(len(pixels))
        return interpolate(self, pixels)

    return counted


def test_the_area_threshold_moves_a_dropped_class_to_the_best_kept_name():
    name_class = torch.tensor([0, 1, 2, 3])
    maps = smooth_cosines(4, 24, 34, seed=3)
    protocol = Protocol(logit_scale=40.0, area_thd=0.05)
    first, _ = classify(upsample(maps, (48, 68)), name_class, 4, Protocol(logit_scale=40.0))
    assert 3 in dropped_classes(first, 4, 0.05).tolist() and bool((first == 3).any())
    labels = grid.grid_labels(maps, (48, 68), name_class, 4, protocol)
    assert not bool((labels == 3).any())
    assert torch.equal(labels, classify(upsample(maps, (48, 68)), name_class, 4, protocol)[0])


def test_a_flat_low_map_is_decided_below_the_threshold_on_the_grid(monkeypatch):
    # every name about as good: the best probability ~1/8 everywhere, under prob_thd 0.5 by
    # the cells' bound, so no pixel is interpolated and every label is class 0
    maps = 0.2 + torch.rand((8, 6, 7), generator=torch.Generator().manual_seed(0)) * 1e-3
    interpolated = []
    monkeypatch.setattr(grid._Bilinear, "__call__", spy(interpolated))
    labels = grid.grid_labels(maps, (40, 50), torch.arange(8) % 5, 5, Protocol(prob_thd=0.5))
    assert sum(interpolated) == 0 and bool((labels == 0).all())


def test_a_confident_map_is_decided_above_the_threshold_on_the_grid(monkeypatch):
    # name 1 leads on the left by 0.2, name 2 on the right: probabilities near 1 on the grid,
    # so only the pixels whose cell straddles the two halves are interpolated
    maps = torch.full((4, 6, 8), 0.1)
    maps[1, :, :4] += 0.2
    maps[2, :, 4:] += 0.2
    interpolated = []
    monkeypatch.setattr(grid._Bilinear, "__call__", spy(interpolated))
    labels = grid.grid_labels(maps, (30, 40), torch.arange(4), 4, Protocol(prob_thd=0.9))
    straddling = 30 * 5  # the output columns whose left corner is grid column 3
    assert sum(interpolated) == straddling
    assert bool((labels[:, :15] == 1).all()) and bool((labels[:, 25:] == 2).all())


@pytest.mark.parametrize("shape", [(1, 1), (1, 6), (5, 1)])
def test_one_pixel_wide_grids(shape):
    maps = torch.rand((6, *shape), generator=torch.Generator().manual_seed(2))
    name_class = torch.tensor([0, 1, 1, 2, 2, 2])
    protocol = Protocol(prob_thd=0.1, area_thd=0.1)
    labels = grid.grid_labels(maps, (7, 9), name_class, 3, protocol)
    assert torch.equal(labels, classify(upsample(maps, (7, 9)), name_class, 3, protocol)[0])
