"""Maps for people in notebooks: an overlay as a PIL image, a matplotlib figure of every
prompt's overlay with its score, and `overlay(image, map)` for any map of any size (the
counterpart of pytorch-grad-cam's `show_cam_on_image`)."""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from .maps import upsample_normalized
from .render import blend_heatmap, colorize

if TYPE_CHECKING:
    from .explanation import Explanation


class Shown:
    """The images an explanation was computed from, converted for display only when shown:
    PIL images as given, or a preprocessed batch un-normalised at the model's size."""

    def __init__(self, preprocess: Any, images: torch.Tensor | Sequence[Image.Image]) -> None:
        self.preprocess = preprocess
        self.images = (
            images[None] if isinstance(images, torch.Tensor) and images.dim() == 3 else images
        )

    def image(self, index: int) -> Image.Image:
        if not isinstance(self.images, torch.Tensor):
            return self.images[index].convert("RGB")
        mean = torch.tensor(self.preprocess.mean).view(3, 1, 1)
        std = torch.tensor(self.preprocess.std).view(3, 1, 1)
        pixels = (self.images[index].detach().float().cpu() * std + mean).clamp(0, 1)
        return Image.fromarray((pixels.permute(1, 2, 0).numpy() * 255.0 + 0.5).astype(np.uint8))

    def box(self, index: int) -> tuple[int, int, int, int]:
        """The part (left, top, right, bottom) of image `index` the model saw."""
        if isinstance(self.images, torch.Tensor):
            return 0, 0, int(self.images.shape[-1]), int(self.images.shape[-2])
        im = self.images[index]
        return self.preprocess.crop_box(im.width, im.height)


def as_rgb(image: Image.Image | np.ndarray) -> np.ndarray:
    """uint8 `[H, W, 3]` from a PIL image or an array (uint8, or floats in [0, 1])."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        arr = (np.clip(arr.astype(np.float64), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    return arr[..., :3] if arr.ndim == 3 else np.repeat(arr[..., None], 3, axis=-1)


def overlay(
    image: Image.Image | np.ndarray,
    saliency: torch.Tensor | np.ndarray,
    colormap: str = "jet",
    alpha: float = 0.5,
) -> Image.Image:
    """`saliency` (`[h, w]`, any resolution, raw scores) min-max normalised, bilinearly
    upsampled to the image and blended over it: `(1 − α)·image + α·colormap(map)`."""
    rgb = as_rgb(image)
    raw = torch.as_tensor(np.asarray(saliency), dtype=torch.float32)
    norm = upsample_normalized(raw[None], rgb.shape[:2])[0].numpy()
    return Image.fromarray(blend_heatmap(rgb, norm, colormap, alpha))


def figure(
    exp: Explanation,
    index: int = 0,
    prompts: Sequence[int] | None = None,
    colormap: str = "jet",
    alpha: float = 0.5,
) -> Any:
    """A matplotlib figure: image `index`, then each prompt's overlay titled with the prompt
    (wrapped, never cut), the method and the model's probability, and a colorbar."""
    import os
    import sys
    import textwrap

    import matplotlib

    if not os.environ.get("MPLBACKEND") and "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")  # no backend chosen (a script, a server): draw off screen
    from matplotlib import pyplot as plt
    from matplotlib.colors import ListedColormap

    chosen = list(range(len(exp.prompts))) if prompts is None else list(prompts)
    fig, axes = plt.subplots(1, 1 + len(chosen), figsize=(2.6 * (1 + len(chosen)) + 0.6, 3.2),
                             squeeze=False)  # fmt: skip
    axes[0, 0].imshow(exp.image(index))
    axes[0, 0].set_title("image", fontsize=9)
    for ax, t in zip(axes[0, 1:], chosen, strict=True):
        ax.imshow(exp.overlay(index, t, colormap, alpha))
        label = "\n".join(textwrap.wrap(exp.prompts[t], 24))
        ax.set_title(f"{label}\n{exp.method} · p = {float(exp.probs[index, t]):.3f}", fontsize=8)
    for ax in axes[0]:
        ax.axis("off")
    ramp = colorize(np.linspace(0.0, 1.0, 256)[None], colormap)[0, :, :3] / 255.0
    mappable = plt.cm.ScalarMappable(cmap=ListedColormap(ramp))
    bar = fig.colorbar(mappable, ax=axes[0, -1], fraction=0.046, pad=0.04)
    bar.set_ticks([0.0, 1.0], labels=["min", "max"])
    fig.tight_layout()
    return fig


def figure_png(exp: Explanation, index: int = 0) -> bytes:
    """`figure` rendered as PNG bytes (what a notebook shows for an `Explanation`)."""
    from matplotlib import pyplot as plt

    fig = figure(exp, index)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()
