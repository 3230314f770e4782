"""ConVis windows: the square image on a canvas of seeded noise, the 1,800 windows over it,
and their embeddings in batches."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..backend import Backend
from ..errors import ClipvizError

SIDE = 224  # the image is centre-cropped to a square and resized to SIDE × SIDE
PAD = 128  # noise on every side: a 480 × 480 canvas
CANVAS = SIDE + 2 * PAD
WINDOW_SIZES = (128, 64)
STRIDE = 16
# the stochastic variant (the reference's defaults)
ITERATIONS, RESTART, EPSILON, GAMMA, CUTOFF = 600, 100, 0.002, 5.0, 91


def square_box(size: tuple[int, int]) -> tuple[int, int, int, int]:
    """The centred square `(left, top, right, bottom)` of an image of `size` (width, height),
    rounded as the reference does."""
    w, h = size
    cx, cy = max(w - h, 0), max(h - w, 0)
    return cx // 2, cy // 2, w - (cx + 1) // 2, h - (cy + 1) // 2


def square_image(image: Image.Image, side: int = SIDE) -> Image.Image:
    """Centre-crop to a square and resize to `side` × `side` (bicubic): what ConVis maps cover."""
    square = image.convert("RGB").crop(square_box(image.size))
    return square.resize((side, side), Image.Resampling.BICUBIC)


def square_from_batch(backend: Backend, images: torch.Tensor, side: int = SIDE) -> np.ndarray:
    """Preprocessed model inputs `[B, 3, H, W]` -> uint8 squares `[B, side, side, 3]`.

    For methods called through `explain`, which only see the backend's tensors.
    """
    mean = torch.tensor(backend.preprocess.mean, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(backend.preprocess.std, device=images.device).view(1, 3, 1, 1)
    x = (images.float() * std + mean).clamp(0, 1)
    H, W = x.shape[-2:]
    s = min(H, W)
    x = x[..., (H - s) // 2 : (H - s) // 2 + s, (W - s) // 2 : (W - s) // 2 + s]
    x = F.interpolate(x, size=(side, side), mode="bicubic", antialias=True, align_corners=False)
    x = (x * 255).round().clamp(0, 255).to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def noise_canvas(square: np.ndarray, seed: int = 0) -> np.ndarray:
    """The square image `[224, 224, 3]` pasted in the middle of seeded uniform noise `[480, 480, 3]`."""
    canvas = np.random.default_rng(seed).integers(0, 256, (CANVAS, CANVAS, 3), dtype=np.uint8)
    canvas[PAD : PAD + SIDE, PAD : PAD + SIDE] = square
    return canvas


def window_boxes(
    canvas: int = CANVAS, sizes: Sequence[int] = WINDOW_SIZES, stride: int = STRIDE
) -> np.ndarray:
    """`[K, 4]` windows `(top, left, bottom, right)`: every size at every multiple of `stride`,
    row by row, clipped to the canvas (`(canvas / stride)²` per size: 900 for 480 px)."""
    corners = np.arange(0, canvas, stride)
    boxes = [
        (y, x, min(y + s, canvas), min(x + s, canvas))
        for s in sizes
        for y in corners
        for x in corners
    ]
    return np.array(boxes, dtype=np.int64)


def window_batch(
    canvas: torch.Tensor, boxes: np.ndarray, backend: Backend
) -> torch.Tensor:  # [k, 3, H, W]
    """The windows of `canvas` (`[3, C, C]` in [0, 1]) through the model's eval transform:
    resize the shorter side to the input size, centre-crop (open_clip's; the backend's
    `Preprocess(crop="center")`). Resizing is torch's antialiased bicubic (PIL's kernel),
    rounded to 8 bits as PIL's is, so all windows of one shape are resized at once."""
    pre = backend.preprocess
    H, W = pre.size
    dev = canvas.device
    out = torch.empty(len(boxes), 3, H, W, device=dev)
    heights, widths = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    span = torch.arange(int(max(heights.max(), widths.max())), device=dev)
    for h, w in sorted(set(zip(heights.tolist(), widths.tolist(), strict=True))):
        sel = np.flatnonzero((heights == h) & (widths == w))
        rows = torch.as_tensor(boxes[sel, 0], device=dev)[:, None] + span[:h]
        cols = torch.as_tensor(boxes[sel, 1], device=dev)[:, None] + span[:w]
        crops = canvas[:, rows[:, :, None], cols[:, None, :]].transpose(0, 1)  # [n, 3, h, w]
        scale = max(H / h, W / w)
        rh, rw = max(H, round(h * scale)), max(W, round(w * scale))
        resized = F.interpolate(crops, size=(rh, rw), mode="bicubic", antialias=True)
        top, left = (rh - H) // 2, (rw - W) // 2
        out[torch.from_numpy(sel).to(dev)] = resized[..., top : top + H, left : left + W]
    out = (out * 255).round().clamp(0, 255) / 255
    mean = torch.tensor(pre.mean, device=dev).view(1, 3, 1, 1)
    std = torch.tensor(pre.std, device=dev).view(1, 3, 1, 1)
    return (out - mean) / std


def canvas_tensor(backend: Backend, canvas: np.ndarray) -> torch.Tensor:
    """uint8 `[C, C, 3]` -> float `[3, C, C]` in [0, 1] on the backend's device."""
    return torch.from_numpy(canvas).to(backend.device).permute(2, 0, 1).float() / 255


@torch.no_grad()
def embed_windows(
    backend: Backend, canvas: np.ndarray, boxes: np.ndarray, batch_size: int = 256
) -> torch.Tensor:  # [K, D]
    """`v_W` for every window: unit image embeddings, all windows in batches."""
    if batch_size < 1:
        raise ClipvizError(f"`batch_size` {batch_size} must be at least 1")
    x = canvas_tensor(backend, canvas)
    out = [
        backend.image_embeddings(window_batch(x, boxes[i : i + batch_size], backend)).float()
        for i in range(0, len(boxes), batch_size)
    ]
    return torch.cat(out)
