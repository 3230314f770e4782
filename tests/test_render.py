"""Colormaps, overlays, slugs and the comparison sheet."""

from __future__ import annotations

import numpy as np
import pytest

from clipviz import ClipvizError
from clipviz.render import blend_heatmap, colorize, comparison_sheet, prompt_slugs


def test_jet_runs_from_dark_blue_through_green_to_dark_red():
    rgb = colorize(np.array([[0.0, 0.5, 1.0]]), "jet")[0].astype(int)
    # each value is coloured at the centre of its level: floor(t·256) + ½, over 256
    centre = (np.array([0, 128, 255]) + 0.5) / 256
    jet = np.clip([[1.5 - abs(4 * t - k) for k in (3, 2, 1)] for t in centre], 0, 1)
    np.testing.assert_array_equal(rgb, (jet * 255 + 0.5).astype(int))
    assert np.abs(rgb - [[0, 0, 128], [128, 255, 128], [128, 0, 0]]).max() <= 2


def test_a_map_is_coloured_through_256_levels():
    t = np.linspace(0, 1, 1001)[None]
    levels = np.minimum(np.floor(t * 256), 255).astype(int)
    for name in ("turbo", "viridis", "magma"):
        rgb = colorize(t, name)[0]
        # one colour per level, and the same colour for values of one level
        table = colorize(((np.arange(256) + 0.5) / 256)[None], name)[0]
        np.testing.assert_array_equal(rgb, table[levels[0]])


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
    out = blend_heatmap(image, norm, "gray", alpha=0.25)  # gray colormap at 0 is black
    np.testing.assert_array_equal(out, np.full((2, 2, 3), 75))
    with pytest.raises(ClipvizError, match="alpha"):
        blend_heatmap(image, norm, alpha=1.5)


def test_unknown_colormap_lists_choices():
    with pytest.raises(ClipvizError, match="jet, turbo, viridis.*any matplotlib colormap"):
        colorize(np.zeros((2, 2)), "no-such-map")


def test_any_matplotlib_colormap_colours_the_map_as_matplotlib_does():
    import matplotlib

    t = np.linspace(0, 1, 7)[None]
    expected = (np.asarray(matplotlib.colormaps["magma"](t))[..., :3] * 255 + 0.5).astype(np.uint8)
    np.testing.assert_array_equal(colorize(t, "magma"), expected)


def test_slugs_are_safe_and_unique():
    assert prompt_slugs(["A red car!", "a red car", "", "x/../y"]) == [
        "a-red-car", "a-red-car-2", "prompt", "x-y",
    ]  # fmt: skip


def test_comparison_sheet_shows_the_image_a_cell_per_prompt_and_method_and_a_colorbar():
    image = np.full((100, 200, 3), 128, dtype=np.uint8)
    maps = {"a": np.zeros((3, 100, 200)), "b": np.ones((3, 100, 200))}
    sheet = comparison_sheet(image, maps, ["p1", "p2", "p3"], "gray", alpha=1.0, cell=50)
    # label column 150 px, cells 50x25 with 4 px gaps (rows at least 2 label lines + 4 high),
    # a 24 px header, the image column first, a 44 px colorbar column
    row = 25  # one label line (16 + 4 px) fits in the 25 px cell
    assert sheet.shape == (24 + 3 * (row + 4), 150 + 3 * 54 + 44, 3)
    np.testing.assert_array_equal(sheet[24 + 10, 150 + 10], [128, 128, 128])  # the image
    np.testing.assert_array_equal(sheet[24 + 10, 150 + 54 + 10], [0, 0, 0])  # method a: map 0
    np.testing.assert_array_equal(sheet[24 + 10, 150 + 2 * 54 + 10], [255, 255, 255])  # b: 1
    bar = sheet[24 + 1 : 24 + 39, -44 + 6 + 4]  # the colorbar's column: white at the top
    assert bar[0].mean() > 240 and bar[-1].mean() < 15


def test_comparison_sheet_labels_are_whole_and_carry_the_scores():
    image = np.zeros((40, 40, 3), dtype=np.uint8)
    maps = {"a": np.zeros((2, 40, 40))}
    long = ["a photo of a small red circle on grass", "a photo of a small red circle on sand"]
    with_scores = comparison_sheet(image, maps, long, cell=40, scores=[0.25, 0.75])
    # 3 and 2 wrapped lines plus the score: rows grow to hold them, so nothing is cut
    first, second = 4 * 16 + 4, 3 * 16 + 4
    assert with_scores.shape[0] == 24 + first + 4 + second + 4
    labels = [with_scores[24 : 24 + second, :150], with_scores[24 + first + 4 :][:second, :150]]
    assert not np.array_equal(labels[0], labels[1])  # the endings differ, so do the labels
