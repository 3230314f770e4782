"""The sliding-window grid of the reference segmentors (mmseg's `slide_inference` rule)."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ClipvizError


@dataclass(frozen=True)
class Window:
    """Rows `top:bottom` and columns `left:right` of the resized image."""

    top: int
    left: int
    bottom: int
    right: int

    @property
    def size(self) -> tuple[int, int]:
        return self.bottom - self.top, self.right - self.left


def check_window(crop: int, stride: int) -> None:
    """Refuse a window and stride the grid cannot use (`crop` 0: the whole image)."""
    if crop < 0:
        raise ClipvizError(f"`window` {crop} must be 0 (the whole image) or a size in pixels")
    if crop and not 1 <= stride <= crop:
        raise ClipvizError(
            f"`stride` {stride} must be between 1 and the window {crop}, or windows leave gaps"
        )


def window_grid(height: int, width: int, crop: int, stride: int) -> list[Window]:
    """Square windows of `crop` pixels every `stride` pixels over a `height` × `width` image,
    row by row; the last window of a row or column is moved back to end at the border, and a
    side shorter than the window is taken whole (no padding). `crop` 0: one window, the
    whole image.

    Per side `max(size − crop + stride − 1, 0) // stride + 1` windows; window i starts at
    `i · stride`, ends at `min(start + crop, size)` and then starts at `max(end − crop, 0)`.
    """
    check_window(crop, stride)
    if crop == 0:
        return [Window(0, 0, height, width)]

    def spans(size: int) -> list[tuple[int, int]]:
        out = []
        for i in range(max(size - crop + stride - 1, 0) // stride + 1):
            end = min(i * stride + crop, size)
            out.append((max(end - crop, 0), end))
        return out

    return [Window(t, left, b, r) for t, b in spans(height) for left, r in spans(width)]
