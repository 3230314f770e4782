"""The segmentation protocol's pure steps, each against a plain step-by-step computation:
resize rounding, the window grid, PAMR, synonyms and thresholds, mmseg's IoU metric."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
import torch

from clipviz.errors import ClipvizError
from clipviz.segment import IoUMetric, Protocol, reduce_zero_label
from clipviz.segment.pamr import pamr
from clipviz.segment.protocol import (
    area_threshold,
    class_probabilities,
    classify,
    labels_from_probabilities,
    merge_windows,
)
from clipviz.segment.resize import rescale_size, resize_image
from clipviz.segment.windows import Window, window_grid

# -- resize ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "short", "expected"),
    [
        ((500, 375), 336, (448, 336)),  # VOC's usual 500x375: 6 windows of 224 at stride 112
        ((500, 333), 336, (505, 336)),  # 504.50 rounds up; flooring would give 504
        ((333, 500), 336, (336, 505)),
        ((3000, 100), 336, (2048, 68)),  # the long side capped at 2048 (68.27 -> 68)
        ((2048, 1024), 560, (1120, 560)),  # Cityscapes at 560
    ],
)
def test_rescale_size_rounds_half_up_as_mmcv(size, short, expected):
    assert rescale_size(*size, short) == expected


def test_rescale_rounding_differs_from_flooring():
    # the case above where flooring, a common reimplementation, gives another size: even the
    # short side, 333 · (336 / 333) = 335.99999…, floors to 335
    w, h = 500, 333
    s = min(2048 / max(w, h), 336 / min(w, h))
    assert (math.floor(w * s), math.floor(h * s)) == (504, 335)
    assert rescale_size(w, h, 336) == (505, 336)


def test_resize_is_opencv_linear_on_uint8():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (37, 50, 3), dtype=np.uint8)
    out = resize_image(image, 24)
    assert out.shape == (24, 32, 3) and out.dtype == np.uint8
    assert np.array_equal(out, cv2.resize(image, (32, 24), interpolation=cv2.INTER_LINEAR))
    assert resize_image(image, 0) is image  # short side 0: as it is


# -- windows ---------------------------------------------------------------------------------


def grid_by_loops(H: int, W: int, crop: int, stride: int) -> list[tuple[int, int, int, int]]:
    """The reference segmentors' loop, written out."""
    h_grids = max(H - crop + stride - 1, 0) // stride + 1
    w_grids = max(W - crop + stride - 1, 0) // stride + 1
    out = []
    for hi in range(h_grids):
        for wi in range(w_grids):
            y1, x1 = hi * stride, wi * stride
            y2, x2 = min(y1 + crop, H), min(x1 + crop, W)
            y1, x1 = max(y2 - crop, 0), max(x2 - crop, 0)
            out.append((y1, x1, y2, x2))
    return out


@pytest.mark.parametrize(
    ("H", "W", "crop", "stride", "count"),
    [(336, 448, 224, 112, 6), (336, 505, 224, 112, 8), (100, 150, 224, 112, 1),
     (560, 1120, 224, 112, 36), (448, 597, 448, 224, 2)],
)  # fmt: skip
def test_window_grid_matches_the_reference_loop(H, W, crop, stride, count):
    windows = window_grid(H, W, crop, stride)
    assert [(w.top, w.left, w.bottom, w.right) for w in windows] == grid_by_loops(
        H, W, crop, stride
    )
    assert len(windows) == count


def test_last_window_snaps_to_the_border_and_small_images_are_one_window():
    windows = window_grid(336, 505, 224, 112)
    assert {(w.left, w.right) for w in windows} == {(0, 224), (112, 336), (224, 448), (281, 505)}
    assert window_grid(100, 150, 224, 112) == [Window(0, 0, 100, 150)]  # no padding
    assert window_grid(336, 448, 0, 0) == [Window(0, 0, 336, 448)]  # window 0: whole image


@pytest.mark.parametrize(("crop", "stride"), [(224, 0), (224, 225), (224, -1), (-1, 10)])
def test_bad_window_or_stride_is_a_usage_error(crop, stride):
    with pytest.raises(ClipvizError) as e:
        window_grid(300, 300, crop, stride)
    assert e.value.exit_code == 2


def test_merge_averages_overlapping_windows_after_upsampling():
    a = torch.tensor([[[1.0, 3.0]]])  # [Q=1, 1, 2] over columns 0..3
    b = torch.tensor([[[5.0]]])  # [1, 1, 1] over columns 2..5
    merged = merge_windows([a, b], [Window(0, 0, 1, 4), Window(0, 2, 1, 6)], (1, 6))
    # a upsampled to 4 columns (align_corners=False): 1, 1.5, 2.5, 3
    expected = [1.0, 1.5, (2.5 + 5) / 2, (3 + 5) / 2, 5.0, 5.0]
    assert torch.allclose(merged[0, 0], torch.tensor(expected))


# -- PAMR ------------------------------------------------------------------------------------


def pamr_by_loops(image: np.ndarray, mask: np.ndarray, steps: int, dilations: list[int]):
    """PAMR pixel by pixel: image [K, H, W], mask [C, H, W] (float64)."""
    K, H, W = image.shape
    offsets = [(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)]

    def at(arr, c, i, j):
        return arr[c, min(max(i, 0), H - 1), min(max(j, 0), W - 1)]  # replicate border

    weights = np.zeros((H, W, 8 * len(dilations)))
    for i in range(H):
        for j in range(W):
            logits = np.zeros(8 * len(dilations))
            for k in range(K):
                window = [at(image, k, i + dy * d, j + dx * d)
                          for d in dilations for dy in (-1, 0, 1) for dx in (-1, 0, 1)]  # fmt: skip
                std = np.std(window, ddof=1)
                p = 0
                for d in dilations:
                    for dy, dx in offsets:
                        diff = abs(image[k, i, j] - at(image, k, i + dy * d, j + dx * d))
                        logits[p] += -diff / (1e-8 + 0.1 * std) / K
                        p += 1
            e = np.exp(logits - logits.max())
            weights[i, j] = e / e.sum()
    for _ in range(steps):
        new = np.zeros_like(mask)
        for c in range(mask.shape[0]):
            for i in range(H):
                for j in range(W):
                    p = 0
                    for d in dilations:
                        for dy, dx in offsets:
                            new[c, i, j] += weights[i, j, p] * at(mask, c, i + dy * d, j + dx * d)
                            p += 1
        mask = new
    return mask


def test_pamr_matches_a_per_pixel_loop():
    rng = np.random.default_rng(1)
    image = rng.normal(size=(3, 7, 6))
    image[:, :3, :3] += 2.0  # an edge for the affinity to respect
    mask = rng.normal(size=(2, 7, 6))
    expected = pamr_by_loops(image, mask, steps=3, dilations=[1, 2])
    out = pamr(torch.tensor(image[None]).float(), torch.tensor(mask[None]).float(), 3, (1, 2))
    assert np.allclose(out[0].numpy(), expected, atol=1e-5)
    assert not np.allclose(expected, mask, atol=1e-2)  # the refinement changed the scores


def test_pamr_refuses_bad_settings():
    x = torch.zeros(1, 3, 4, 4)
    for steps, dilations in ((-1, (1,)), (2, ()), (2, (0, 8))):
        with pytest.raises(ClipvizError):
            pamr(x, x, steps, dilations)


# -- class probabilities: synonyms, area threshold, prob_thd ---------------------------------


def cos_pixels(*pixels: list[float]) -> torch.Tensor:
    """Cosines `[Q, 1, N]` of N pixels."""
    return torch.tensor(pixels).T[:, None, :]


def test_softmax_over_all_names_comes_before_the_synonym_max():
    name_class = torch.tensor([0, 1, 1, 2])  # class 1 has two names
    # pixel A: class 0 alone at 0.30, class 1's two names at 0.295
    a = cos_pixels([0.30, 0.295, 0.295, 0.0])
    probs = class_probabilities(a, name_class, 3, 100.0)
    assert labels_from_probabilities(probs, 0.0).item() == 0
    # summing the synonyms' probabilities would choose class 1
    summed = torch.zeros(3).index_add_(0, name_class, (a[:, 0, 0] * 100).softmax(0))
    assert summed.argmax().item() == 1
    # pixel B: class 1's best name at 0.30 shares the softmax with its synonym
    b = cos_pixels([0.2, 0.3, 0.3, 0.2])
    probs = class_probabilities(b, name_class, 3, 100.0)
    assert abs(probs[1].item() - 0.5) < 1e-3
    assert labels_from_probabilities(probs, 0.6).item() == 0  # below prob_thd: class 0
    # the max over synonyms' cosines before the softmax would keep class 1 (p ~ 1)
    first_max = torch.stack([b[0], b[1:3].max(0).values, b[3]])
    assert (first_max[:, 0, 0] * 100).softmax(0)[1].item() > 0.99


def probs_with_argmax_counts(counts: list[int]) -> torch.Tensor:
    """Class probabilities `[K, 1, N]` whose argmax gives class c on counts[c] pixels; class
    0 is every pixel's second choice."""
    K, N = len(counts), sum(counts)
    probs = torch.full((K, 1, N), 0.01)
    probs[0] = 0.3
    start = 0
    for c, n in enumerate(counts):
        probs[c, 0, start : start + n] = 0.6 if c else 0.9
        start += n
    return probs


def test_area_threshold_counts_foreground_only_and_is_strict():
    # foreground 2 + 8 = 10 pixels: class 1 has 20 % of it, kept at area_thd 0.1 (over all
    # 100 pixels it would have 2 % and be dropped)
    probs = probs_with_argmax_counts([90, 2, 8])
    labels = labels_from_probabilities(area_threshold(probs, 0.1), 0.0)
    assert torch.bincount(labels.flatten(), minlength=3).tolist() == [90, 2, 8]
    # class 1 with exactly 10 % of the foreground is dropped (the test is `>`), its pixels go
    # to their next class, 0
    probs = probs_with_argmax_counts([5, 1, 9])
    labels = labels_from_probabilities(area_threshold(probs, 0.1), 0.0)
    assert torch.bincount(labels.flatten(), minlength=3).tolist() == [6, 0, 9]
    # background is never dropped, however small
    probs = probs_with_argmax_counts([1, 0, 50])
    labels = labels_from_probabilities(area_threshold(probs, 0.5), 0.0)
    assert torch.bincount(labels.flatten(), minlength=3).tolist() == [1, 0, 50]


def test_prob_thd_is_strict_and_sends_pixels_to_class_zero():
    probs = torch.tensor([[[0.2, 0.1]], [[0.5, 0.2]], [[0.3, 0.7]]])  # [K=3, 1, 2]
    assert labels_from_probabilities(probs, 0.5).tolist() == [[1, 2]]  # 0.5 is not < 0.5
    assert labels_from_probabilities(probs, 0.51).tolist() == [[0, 2]]


def test_classify_chains_the_steps():
    cos = cos_pixels([0.1, 0.3, 0.2], [0.3, 0.1, 0.2])
    labels, probs = classify(cos, torch.tensor([0, 1, 2]), 3, Protocol(logit_scale=10.0))
    expected = (cos * 10).softmax(0)
    assert torch.allclose(probs, expected) and labels.tolist() == [[1, 0]]


@pytest.mark.parametrize(
    "settings",
    [{"stride": 0}, {"stride": 300}, {"logit_scale": 0.0}, {"logit_scale": float("nan")},
     {"prob_thd": 1.5}, {"area_thd": -0.1}, {"short_side": -1}, {"pamr_steps": -2}],
)  # fmt: skip
def test_bad_protocol_settings_are_usage_errors(settings):
    with pytest.raises(ClipvizError) as e:
        Protocol(**settings).check()
    assert e.value.exit_code == 2


# -- metric ----------------------------------------------------------------------------------


def test_iou_metric_matches_a_hand_computation():
    metric = IoUMetric(num_classes=4)
    # 255 is ignored; label 7 is outside 0..3: no label count, but its prediction (2) counts
    metric.add(np.array([[0, 1, 1], [1, 2, 2]]), np.array([[0, 0, 1], [1, 255, 7]]))
    metric.add(np.array([[2, 0]]), np.array([[2, 2]]))
    # intersection [1, 2, 1, 0], prediction [2, 3, 2, 0], label [2, 2, 2, 0]
    assert metric.totals.tolist() == [[1, 2, 1, 0], [3, 3, 3, 0], [2, 3, 2, 0], [2, 2, 2, 0]]
    iou = metric.iou
    assert np.allclose(iou[:3], [1 / 3, 2 / 3, 1 / 3]) and np.isnan(iou[3])
    summary = metric.summary(["bg", "a", "b", "c"])
    # class 3, absent and never predicted, is left out of the mean
    assert summary["mIoU"] == 44.44 and summary["aAcc"] == 66.67 and summary["mAcc"] == 66.67
    assert summary["IoU"] == {"bg": 33.33, "a": 66.67, "b": 33.33, "c": None}


def test_iou_is_summed_over_the_split_not_averaged_per_image():
    metric = IoUMetric(num_classes=2)
    metric.add(np.array([1, 1, 1, 1]), np.array([1, 1, 1, 1]))  # IoU of class 1: 1
    metric.add(np.array([1, 0]), np.array([0, 0]))  # class 1 predicted, absent: IoU 0
    assert metric.totals[:2, 1].tolist() == [4, 5]
    assert metric.iou[1] == pytest.approx(4 / 5)  # not the mean of per-image IoUs (0.5)


def test_reduce_zero_label_as_mmseg():
    label = np.array([0, 1, 2, 254, 255], dtype=np.uint8)
    assert reduce_zero_label(label).tolist() == [255, 0, 1, 253, 255]
