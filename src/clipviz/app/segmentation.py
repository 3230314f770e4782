"""The Segment tab's computation, without the web: class names from the page's text, one
image segmented by the protocol's defaults, and its label overlay with a legend (as `clipviz
segment` writes them)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from ..errors import ClipvizError
from ..segment import ClassNames
from .session import Limits


def parse_class_lines(text: str, limits: Limits = Limits()) -> ClassNames:
    """`ClassNames` from the page's text: one class per line in label order (line 0: the
    background), synonyms separated by `,` or `;`, as in a classes file."""
    from ..segment import parse_classes

    names = parse_classes((text or "").strip().replace("\r\n", "\n"), "the classes box")
    if len(names.names) > limits.max_class_names:
        raise ClipvizError(
            f"{len(names.names)} class names given; this app takes at most "
            f"{limits.max_class_names} per request"
        )
    return names


@dataclass
class SegmentResult:
    """One image segmented: its pixels, the labels `[H, W]` and the classes they index."""

    image: np.ndarray  # [H, W, 3] uint8
    labels: np.ndarray  # [H, W] class indices
    classes: ClassNames
    method: str


def segment_image(
    backend: Any, image: Image.Image, classes: ClassNames, method: str
) -> SegmentResult:
    """`image` segmented into `classes` by `method`'s maps with the protocol's defaults
    (the protocol's defaults: short side 336, windows of 224 with stride 112, logit scale 40)."""
    from ..segment import segment

    arr = np.asarray(image)
    [found] = segment(backend, [arr], classes, method)
    if found.labels is None:
        raise ClipvizError(str(found.error))
    return SegmentResult(arr, found.labels, classes, method)


def segment_view(result: SegmentResult, alpha: float) -> tuple[Image.Image, list[list[Any]]]:
    """The label overlay with its legend (as `clipviz segment` writes it) and the legend's
    rows: (label, names, share of the pixels in %), largest first."""
    from ..segment.outputs import overlay_with_legend

    labels = result.classes.labels
    shown = overlay_with_legend(result.image, result.labels, labels, float(alpha))
    counts = np.bincount(result.labels.ravel(), minlength=len(labels))
    rows = [
        [int(c), ", ".join(result.classes.lines[c]), round(100 * counts[c] / counts.sum(), 2)]
        for c in np.argsort(-counts, kind="stable")
        if counts[c]
    ]
    return Image.fromarray(shown), rows
