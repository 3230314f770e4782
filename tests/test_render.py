"""Colormaps, overlays, slugs and the comparison sheet."""

from __future__ import annotations

import numpy as np
import pytest

from clipviz import ClipvizError
from clipviz.render import colorize, comparison_sheet, overlay, prompt_slugs


def test_jet_runs_from_dark_blue_through_green_to_dark_red():
    rgb = colorize(np.array([[0.0, 0.5, 1.0]]), "jet")[0]
    np.testing.assert_array_equal(rgb, [[0, 0, 128], [128, 255, 128], [128, 0, 0]])


@pytest.mark.parametrize(
    ("name", "low", "high"),
    [("viridis", (68, 1, 84), (253, 231, 37)), ("inferno", (0, 0, 4), (252, 255, 164))],
)
def test_perceptual_maps_match_matplotlib_endpoints(name, low, high):
    rgb = colorize(np.array([[0.0, 1.0]]), name)[0].astype(int)
    assert np.abs(rgb[0] - low).max() <= 8 and np.abs(rgb[1] - high).max() <= 12


def test_overlay_blends_with_alpha():
    image = np.full((2, 2, 3), 100, dtype=np.uint8)
    norm = np.zeros((2, 2))
    out = overlay(image, norm, "gray", alpha=0.25)  # gray colormap at 0 is black
    np.testing.assert_array_equal(out, np.full((2, 2, 3), 75))
    with pytest.raises(ClipvizError, match="alpha"):
        overlay(image, norm, alpha=1.5)


def test_unknown_colormap_lists_choices():
    with pytest.raises(ClipvizError, match="jet, turbo, viridis"):
        colorize(np.zeros((2, 2)), "rainbow")


def test_slugs_are_safe_and_unique():
    assert prompt_slugs(["A red car!", "a red car", "", "x/../y"]) == [
        "a-red-car", "a-red-car-2", "prompt", "x-y",
    ]  # fmt: skip


def test_comparison_sheet_has_a_cell_per_prompt_and_method():
    image = np.zeros((100, 200, 3), dtype=np.uint8)
    maps = {"a": np.zeros((3, 100, 200)), "b": np.ones((3, 100, 200))}
    sheet = comparison_sheet(image, maps, ["p1", "p2", "p3"], "gray", alpha=1.0, cell=50)
    # label column 150 px, cells 50x25 with 4 px gaps, a 24 px header
    assert sheet.shape == (24 + 3 * 29, 150 + 2 * 54, 3)
    np.testing.assert_array_equal(sheet[24 + 10, 150 + 10], [0, 0, 0])  # method a: map 0
    np.testing.assert_array_equal(sheet[24 + 10, 150 + 54 + 10], [255, 255, 255])  # b: map 1
