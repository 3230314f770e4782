"""The protocol's resize: mmseg's `Resize(scale=(2048, S), keep_ratio=True)`.

The new size follows mmcv's `rescale_size` (each side `int(x · s + 0.5)`, not floored), and
the pixels are OpenCV's `INTER_LINEAR` on the uint8 image, as mmcv's `imresize` computes them
(fixed-point weights, no antialiasing, `INTER_AREA` for an exact 2× reduction): the reference
code's pixels, which a float bilinear or PIL's resize do not reproduce.
"""

from __future__ import annotations

import cv2
import numpy as np

from ..errors import ClipvizError

LONG_SIDE_CAP = 2048  # the `2048` of `scale=(2048, S)`


def rescale_size(
    width: int, height: int, short_side: int, long_cap: int = LONG_SIDE_CAP
) -> tuple[int, int]:
    """`(new_width, new_height)`: the short side `short_side`, the long side at most
    `long_cap`, aspect kept, each side rounded half up as mmcv does."""
    scale = min(max(long_cap, short_side) / max(width, height),
                min(long_cap, short_side) / min(width, height))  # fmt: skip
    return int(width * scale + 0.5), int(height * scale + 0.5)


def resize_image(image: np.ndarray, short_side: int) -> np.ndarray:
    """A uint8 `[H, W, 3]` image resized for the protocol (`short_side` 0: as it is)."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ClipvizError(
            f"expected a uint8 RGB image [H, W, 3], not {image.dtype} {list(image.shape)}"
        )
    if short_side < 0:
        raise ClipvizError(f"`short_side` {short_side} must be 0 (no resize) or more")
    if short_side == 0:
        return image
    height, width = image.shape[:2]
    size = rescale_size(width, height, short_side)
    if min(size) < 1:
        raise ClipvizError(
            f"a {width}x{height} image resized to short side {short_side} has no pixels left; "
            "it is too long and thin for the protocol's cap on the long side: crop it",
            exit_code=1,
        )
    return cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)
