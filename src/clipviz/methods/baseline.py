"""Reference maps every localisation number is read against: chance level (uniform random
maps: a random point hits an object about as often as the object's area share) and the
model's own attention, which ignores the text."""

from __future__ import annotations

import torch

from ..backend import Backend, Texts
from . import MapResult


def random_map(backend: Backend, images: torch.Tensor, texts: Texts, seed: int = 0) -> MapResult:
    h, w = backend.grid_size(images)
    generator = torch.Generator().manual_seed(seed)
    maps = torch.rand(images.shape[0], len(texts.prompts), h, w, generator=generator)
    return MapResult(maps)


def attention_map(backend: Backend, images: torch.Tensor, texts: Texts) -> MapResult:
    """The global query's attention over the positions in the last attention layer (ViT:
    class token, mean over heads; RN: the attention pool's mean-token query) — ECLIP's
    "free attention". It ignores the text: the same map for every prompt."""
    from .eclip import frozen_features

    feats = frozen_features(backend, images)
    h, w = backend.grid_size(images)
    maps = feats.free_attention.view(-1, 1, h, w).expand(-1, len(texts.prompts), h, w)
    return MapResult(maps.contiguous(), image_embeddings=feats.stock_embedding)
