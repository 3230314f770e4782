"""Metrics on hand-made maps whose answers are known."""

from __future__ import annotations

import math
from collections import deque

import numpy as np
import pytest
import torch

from clipviz.errors import ClipvizError
from clipviz.maps import normalize_map
from clipviz.metrics import (
    MIOU_THRESHOLDS,
    MaxBoxAcc,
    MIoU,
    box_correct,
    box_iou,
    deletion_insertion_curve,
    energy_pointing,
    gaussian_blur,
    largest_component_box,
    mean_score_contrast,
    pointing_hit,
    score_contrast,
)


def square_mask(size: int, top: int, left: int, side: int) -> np.ndarray:
    mask = np.zeros((size, size), dtype=bool)
    mask[top : top + side, left : left + side] = True
    return mask


# 10x10 image, object = rows 2..5, cols 2..5 (16 px of 100)
MASK = square_mask(10, 2, 2, 4)
# 40x40 image, object = rows 30..35, cols 30..35 (36 px of 1600), far from the top-left corner
FAR_MASK = square_mask(40, 30, 30, 6)


# --- normalisation ---------------------------------------------------------------------------


def test_normalize_map_spans_zero_to_one_and_constant_map_is_zero() -> None:
    np.testing.assert_allclose(
        normalize_map(np.array([[2.0, 4.0], [6.0, 3.0]])), [[0, 0.5], [1, 0.25]]
    )
    np.testing.assert_array_equal(normalize_map(np.full((3, 3), 7.0)), np.zeros((3, 3)))


# --- mIoU ------------------------------------------------------------------------------------


def test_perfect_map_has_miou_one_at_every_threshold_and_picks_the_lowest() -> None:
    metric = MIoU()
    metric.update(MASK * 5.0 - 1.0, MASK, "cat")
    result = metric.result()
    np.testing.assert_array_equal(result.curve, np.ones(19))
    assert result.miou == 1.0
    assert result.threshold == 0.05
    assert result.per_class == {"cat": 1.0}


def test_miou_threshold_is_the_one_that_separates_object_from_clutter() -> None:
    # object at 0.72 (one peak pixel at 1), 8 clutter pixels at 0.42, rest 0
    m = MASK * 0.72
    m[2, 2] = 1.0
    m[8, :8] = 0.42
    metric = MIoU()
    metric.update(m, MASK, "cat")
    result = metric.result()
    expected = np.where(
        MIOU_THRESHOLDS <= 0.42, 16 / 24, np.where(MIOU_THRESHOLDS <= 0.72, 1.0, 1 / 16)
    )
    np.testing.assert_allclose(result.curve, expected)
    assert result.threshold == 0.45
    assert result.miou == 1.0


def test_miou_sums_intersection_and_union_over_images_before_dividing() -> None:
    metric = MIoU(thresholds=[0.5])
    metric.update(MASK.astype(float), MASK, "cat")  # I = 16, U = 16
    wrong = square_mask(10, 7, 7, 2)  # 4 predicted px, disjoint from the 4-px object
    metric.update(wrong.astype(float), square_mask(10, 0, 0, 2), "cat")  # I = 0, U = 8
    metric.update(MASK.astype(float), MASK, "dog")  # IoU 1
    result = metric.result()
    assert result.per_class == {"cat": pytest.approx(16 / 24), "dog": 1.0}  # not (1 + 0) / 2
    assert result.miou == pytest.approx((16 / 24 + 1) / 2)


def test_miou_ignores_pixels_marked_invalid() -> None:
    m = MASK.astype(float)
    m[0, :] = 1.0  # lights a border row that the ground truth marks as "ignore"
    valid = np.ones_like(MASK)
    valid[0, :] = False
    with_ignore, without = MIoU(thresholds=[0.5]), MIoU(thresholds=[0.5])
    with_ignore.update(m, MASK, "cat", valid=valid)
    without.update(m, MASK, "cat")
    assert with_ignore.result().miou == 1.0
    assert without.result().miou == pytest.approx(16 / 26)


def test_miou_rejects_a_class_absent_from_the_mask() -> None:
    with pytest.raises(ClipvizError, match="no valid mask pixels"):
        MIoU().update(np.ones((10, 10)), np.zeros((10, 10), dtype=bool), "cat")


# --- score contrast --------------------------------------------------------------------------


def test_score_contrast_of_perfect_inverted_and_uniform_maps() -> None:
    assert score_contrast(MASK * 3.0, MASK) == 100.0
    assert score_contrast(~MASK * 3.0, MASK) == -100.0
    assert score_contrast(np.full((10, 10), 0.3), MASK) == 0.0


def test_score_contrast_of_a_graded_map_matches_hand_count() -> None:
    # fg = 1; bg in cols 0..4 = 0.5 (38 px: 50 minus 12 object px), bg in cols 5..9 = 0 (46 px)
    m = MASK.astype(float)
    m[:, :5][~MASK[:, :5]] = 0.5
    assert score_contrast(m, MASK) == pytest.approx(100 * (1 - 19 / 84))


def test_score_contrast_is_nan_without_background_and_msc_skips_nan() -> None:
    assert math.isnan(score_contrast(np.ones((4, 4)), np.ones((4, 4), dtype=bool)))
    assert mean_score_contrast([100.0, math.nan, -50.0]) == 25.0
    assert math.isnan(mean_score_contrast([math.nan]))


# --- pointing games --------------------------------------------------------------------------


def peak_at(y: int, x: int, size: int = 40) -> np.ndarray:
    m = np.zeros((size, size))
    m[y, x] = 1.0
    return m


def test_perfect_map_hits_and_inverted_map_misses() -> None:
    assert pointing_hit(FAR_MASK.astype(float), FAR_MASK)
    # the inverted map's maximum ties everywhere off the object; the first one is (0, 0)
    assert not pointing_hit((~FAR_MASK).astype(float), FAR_MASK)


def test_peak_ten_pixels_above_the_mask_hits_at_15_and_misses_at_5() -> None:
    m = peak_at(20, 32)  # nearest object pixel is (30, 32)
    assert pointing_hit(m, FAR_MASK, tolerance_px=15)
    assert pointing_hit(m, FAR_MASK, tolerance_px=10)  # boundary counts as a hit
    assert not pointing_hit(m, FAR_MASK, tolerance_px=9.99)
    assert not pointing_hit(m, FAR_MASK, tolerance_px=5)


def test_pointing_distance_is_euclidean() -> None:
    m = peak_at(22, 22)  # sqrt(8² + 8²) ≈ 11.31 from the corner (30, 30)
    assert pointing_hit(m, FAR_MASK, tolerance_px=11.32)
    assert not pointing_hit(m, FAR_MASK, tolerance_px=11.31)


def test_zero_tolerance_needs_the_peak_on_the_mask() -> None:
    assert pointing_hit(peak_at(30, 30), FAR_MASK, tolerance_px=0)
    assert not pointing_hit(peak_at(29, 30), FAR_MASK, tolerance_px=0)


def test_energy_pointing_of_perfect_inverted_and_uniform_maps() -> None:
    assert energy_pointing(FAR_MASK * 2.0, FAR_MASK) == 1.0
    assert energy_pointing(~FAR_MASK * 2.0, FAR_MASK) == 0.0
    assert energy_pointing(np.ones((40, 40)), FAR_MASK) == pytest.approx(36 / 1600)


def test_energy_pointing_counts_mass_after_normalisation() -> None:
    m = np.ones((40, 40))  # minimum 1 becomes 0
    m[FAR_MASK] = 3.0  # -> 1
    m[0, :4] = 2.0  # -> 0.5 each, 2 units of mass off the object
    assert energy_pointing(m, FAR_MASK) == pytest.approx(36 / 38)


# --- MaxBoxAcc -------------------------------------------------------------------------------

# 20x20: big component A rows/cols 2..9 (64 px) at 0.555, small component B rows/cols 12..17
# (36 px) at 1.0, background 0
BIG, SMALL = (2, 2, 10, 10), (12, 12, 18, 18)


def two_blobs() -> np.ndarray:
    m = square_mask(20, 2, 2, 8) * 0.555
    m[square_mask(20, 12, 12, 6)] = 1.0
    return m


def test_box_accuracy_when_the_larger_component_is_the_object() -> None:
    metric = MaxBoxAcc()
    metric.update(two_blobs(), [BIG])
    result = metric.result()
    taus = np.arange(100) / 100
    # τ = 0 keeps the whole image (IoU 0.16); 0 < τ <= 0.555 keeps both, A is larger; then only B
    np.testing.assert_array_equal(result.curve, ((taus > 0) & (taus <= 0.555)).astype(float))
    assert result.max_box_acc == 1.0
    assert result.threshold == 0.01


def test_box_accuracy_when_the_larger_component_is_a_distractor() -> None:
    correct = box_correct(two_blobs(), [SMALL])
    taus = np.arange(100) / 100
    np.testing.assert_array_equal(correct, taus > 0.555)
    assert not correct[[0, 1, 30, 55]].any() and correct[[56, 80, 99]].all()


def test_max_box_acc_averages_over_images_and_accepts_any_gt_box() -> None:
    metric = MaxBoxAcc()
    metric.update(two_blobs(), [BIG])
    metric.update(two_blobs(), [SMALL])
    metric.update(two_blobs(), [SMALL, BIG])  # correct wherever one of the two is matched
    result = metric.result()
    assert result.curve[0] == 0.0
    assert result.curve[30] == pytest.approx(2 / 3)
    assert result.curve[80] == pytest.approx(2 / 3)
    assert result.max_box_acc == pytest.approx(2 / 3)


def test_empty_binarisation_is_incorrect() -> None:
    np.testing.assert_array_equal(
        box_correct(np.zeros((8, 8)), [(0, 0, 8, 8)], [0.0, 0.5]), [True, False]
    )


def test_box_iou_of_exactly_half_is_not_enough() -> None:
    assert box_iou((0, 0, 10, 10), (0, 0, 10, 5)) == 0.5
    m = np.zeros((10, 10))
    m[:5, :] = 1.0
    assert not box_correct(m, [(0, 0, 10, 10)], [0.5])[0]


def test_diagonal_neighbours_are_separate_components() -> None:
    b = np.zeros((6, 6), dtype=bool)
    b[0:2, 0:2] = True  # 4 px
    b[2:5, 2:5] = True  # 9 px, touches the first only at a corner
    assert largest_component_box(b) == (2, 2, 5, 5)
    assert largest_component_box(np.zeros((3, 3), dtype=bool)) is None


def test_spiral_is_one_component() -> None:
    art = ["#######", "......#", "#####.#", "#...#.#", "#.###.#", "#.....#", "#######"]
    b = np.array([[c == "#" for c in row] for row in art])
    assert largest_component_box(b) == (0, 0, 7, 7)


def test_equal_components_tie_to_the_first_in_raster_order() -> None:
    b = np.zeros((5, 5), dtype=bool)
    b[4, 0:2] = b[0, 3:5] = True
    assert largest_component_box(b) == (3, 0, 5, 1)


def reference_largest_box(b: np.ndarray) -> tuple[int, int, int, int] | None:
    """Plain BFS labelling, the obvious way, to check the run-based one."""
    seen = np.zeros_like(b)
    best: tuple[int, tuple[int, int, int, int]] | None = None
    for y0, x0 in zip(*np.nonzero(b), strict=True):
        if seen[y0, x0]:
            continue
        seen[y0, x0] = True
        queue, pixels = deque([(y0, x0)]), []
        while queue:
            y, x = queue.popleft()
            pixels.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < b.shape[0] and 0 <= nx < b.shape[1] and b[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        ys, xs = zip(*pixels, strict=True)
        box = (min(xs), min(ys), max(xs) + 1, max(ys) + 1)
        if best is None or len(pixels) > best[0]:
            best = (len(pixels), box)
    return None if best is None else best[1]


def test_largest_component_matches_bfs_on_random_maps() -> None:
    rng = np.random.default_rng(0)
    for density in (0.3, 0.5, 0.6, 0.7):
        for _ in range(10):
            b = rng.random((25, 31)) < density
            assert largest_component_box(b) == reference_largest_box(b)


# --- deletion / insertion --------------------------------------------------------------------

# 20x20 image of 2s; the toy "similarity" is the mean of rows 0..1 (40 px). Each 5 % step is
# exactly 20 px = one row. Saliency constant per row: rows rank in raster order when tied.
IMAGE = torch.full((3, 20, 20), 2.0)
ROWS = torch.arange(20, dtype=torch.float32).view(20, 1).expand(20, 20)


def top_rows_similarity(x: torch.Tensor) -> torch.Tensor:
    return x[:, :, :2, :].mean(dim=(1, 2, 3))


def test_deleting_the_region_first_gives_a_low_deletion_auc() -> None:
    first = deletion_insertion_curve(IMAGE, -ROWS, top_rows_similarity, baseline="zero")
    last = deletion_insertion_curve(IMAGE, ROWS, top_rows_similarity, baseline="zero")
    np.testing.assert_allclose(first.fractions, np.arange(21) / 20)
    np.testing.assert_allclose(first.scores, [1.0, 0.5] + [0.0] * 19)
    np.testing.assert_allclose(last.scores, [1.0] * 19 + [0.5, 0.0])
    assert first.auc == pytest.approx(0.0375 + 0.0125)
    assert last.auc == pytest.approx(0.9 + 0.0375 + 0.0125)


def test_insertion_reveals_the_region_onto_the_baseline() -> None:
    result = deletion_insertion_curve(
        IMAGE, -ROWS, top_rows_similarity, "insertion", baseline="zero"
    )
    np.testing.assert_allclose(result.scores, [0.0, 0.5] + [1.0] * 19)
    assert result.auc == pytest.approx(0.95)


def test_tied_saliency_ranks_pixels_in_raster_order() -> None:
    tied = deletion_insertion_curve(IMAGE, np.zeros((20, 20)), top_rows_similarity, baseline="zero")
    np.testing.assert_allclose(tied.scores[:3], [1.0, 0.5, 0.0])


def test_mean_baseline_replaces_pixels_by_the_channel_mean() -> None:
    image = torch.zeros(3, 20, 20)
    image[:, :10] = 4.0  # channel mean 2, the top rows hold 4
    result = deletion_insertion_curve(image, -ROWS, top_rows_similarity, baseline="mean")
    np.testing.assert_allclose(result.scores[[0, 1, 2, 20]], [1.0, 0.75, 0.5, 0.5])


def test_similarity_is_called_in_one_batch_or_in_chunks() -> None:
    sizes: list[int] = []

    def recording(x: torch.Tensor) -> torch.Tensor:
        sizes.append(x.shape[0])
        return top_rows_similarity(x)

    deletion_insertion_curve(IMAGE, ROWS, recording, baseline="zero")
    deletion_insertion_curve(IMAGE, ROWS, recording, baseline="zero", batch_size=8)
    assert sizes == [21, 8, 8, 5]


def test_zero_reference_similarity_gives_nan() -> None:
    result = deletion_insertion_curve(
        IMAGE, ROWS, lambda x: torch.zeros(x.shape[0]), baseline="zero"
    )
    assert math.isnan(result.auc) and np.isnan(result.scores).all()


def test_blur_keeps_constants_and_spreads_an_impulse_symmetrically() -> None:
    np.testing.assert_allclose(
        gaussian_blur(torch.full((3, 16, 16), 0.7), 1.5).numpy(), 0.7, atol=1e-6
    )
    impulse = torch.zeros(1, 31, 31)
    impulse[0, 15, 15] = 1.0
    blurred = gaussian_blur(impulse, 2.0)[0]
    assert blurred.sum().item() == pytest.approx(1.0, abs=1e-5)
    assert blurred[15, 15] == blurred.max()
    np.testing.assert_allclose(blurred.numpy(), blurred.T.numpy(), atol=1e-7)
    np.testing.assert_allclose(blurred.numpy(), blurred.flip(0).numpy(), atol=1e-7)


def test_step_must_divide_one() -> None:
    with pytest.raises(ClipvizError, match="step"):
        deletion_insertion_curve(IMAGE, ROWS, top_rows_similarity, step=0.3)
