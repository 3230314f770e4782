"""The app's Segment tab, without the web: class names → the label overlay with its legend,
as `clipviz segment` draws it."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import random_image

from clipviz.app import segmentation, session
from clipviz.errors import ClipvizError
from clipviz.segment import Segmenter, parse_classes
from clipviz.segment.outputs import overlay_with_legend


def test_segment_tab_draws_the_labels_of_the_segmenter_with_their_legend(vit_backend):
    image = random_image(seed=2, size=(80, 60))
    classes = segmentation.parse_class_lines("background\nred circle ; disc\nblue square\n\n")
    assert classes == parse_classes("background\nred circle;disc\nblue square")
    result = segmentation.segment_image(vit_backend, image, classes, "sclip")
    [expected] = Segmenter(vit_backend, classes, "sclip")([np.asarray(image)])
    assert np.array_equal(result.labels, expected.labels)
    shown, rows = segmentation.segment_view(result, 0.3)
    drawn = overlay_with_legend(np.asarray(image), expected.labels, classes.labels, 0.3)
    assert np.array_equal(np.asarray(shown), drawn)
    counts = np.bincount(expected.labels.ravel(), minlength=3)
    assert sorted(row[0] for row in rows) == [c for c in range(3) if counts[c]]
    assert rows == sorted(rows, key=lambda row: -row[2])  # largest first
    for label, names, share in rows:
        assert names == ", ".join(classes.lines[label])
        assert share == round(100 * counts[label] / counts.sum(), 2)
    # alpha changes the drawing, not the labels
    clear, _ = segmentation.segment_view(result, 0.0)
    assert np.array_equal(np.asarray(clear)[:60, :80], np.asarray(image))


def test_segment_tab_refuses_empty_and_too_many_class_names():
    with pytest.raises(ClipvizError, match="names no class"):
        segmentation.parse_class_lines("  \n")
    with pytest.raises(ClipvizError, match="at most 3 per request"):
        segmentation.parse_class_lines("a\nb, c\nd", session.Limits(max_class_names=3))
