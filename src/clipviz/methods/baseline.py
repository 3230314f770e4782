"""Chance level: uniform random maps, the baseline every localisation number is read against
(a random point hits an object about as often as the object's area share)."""

from __future__ import annotations

import torch

from ..backend import Backend, Texts
from . import MapResult


def random_map(backend: Backend, images: torch.Tensor, texts: Texts, seed: int = 0) -> MapResult:
    h, w = backend.grid_size(images)
    generator = torch.Generator().manual_seed(seed)
    maps = torch.rand(images.shape[0], len(texts.prompts), h, w, generator=generator)
    return MapResult(maps)
