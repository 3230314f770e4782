"""Image -> model input: the resize (or open_clip's centre crop) and CLIP normalisation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from PIL import Image

Crop = Literal["none", "center"]


@dataclass(frozen=True)
class Preprocess:
    """Image -> normalised tensor; picklable so image decoding can run in worker processes.

    `crop="none"` resizes the whole image to the input size (the map covers the whole
    picture); `crop="center"` is open_clip's eval transform (shortest side, centre crop).
    """

    size: tuple[int, int]  # (height, width)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop: Crop = "none"

    def _center_geometry(self, width: int, height: int) -> tuple[float, int, int, int, int]:
        """`crop="center"` on a `width` × `height` image: the resize scale, the resized size
        `(rw, rh)` and the crop's top-left corner `(left, top)` in resized pixels."""
        h, w = self.size
        scale = max(h / height, w / width)
        rw, rh = max(w, round(width * scale)), max(h, round(height * scale))
        return scale, rw, rh, (rw - w) // 2, (rh - h) // 2

    def crop_box(self, width: int, height: int) -> tuple[int, int, int, int]:
        """The part `(left, top, right, bottom)` of a `width` × `height` image the model sees."""
        if self.crop != "center":
            return 0, 0, width, height
        h, w = self.size
        scale, _, _, left, top = self._center_geometry(width, height)
        # the crop in resized pixels, mapped back onto the original image
        return (
            round(left / scale),
            round(top / scale),
            min(width, round((left + w) / scale)),
            min(height, round((top + h) / scale)),
        )

    def __call__(self, image: Image.Image) -> torch.Tensor:
        h, w = self.size
        if self.crop == "center":
            _, rw, rh, left, top = self._center_geometry(image.width, image.height)
            image = image.resize((rw, rh), Image.Resampling.BICUBIC)
            image = image.crop((left, top, left + w, top + h))
        else:
            image = image.resize((w, h), Image.Resampling.BICUBIC)
        x = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0)
        x = x.permute(2, 0, 1)
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        return (x - mean) / std
