"""Reference maps every localisation number is read against: chance level (uniform random
maps: a random point hits an object about as often as the object's area share) and the
model's own attention, which ignores the text."""

from __future__ import annotations

import zlib

import torch

from ..backend import Backend, Texts
from ..backend.towers import MAP, RESNET, TOKENS
from ..eclip.head import frozen_features
from .registry import MapResult, register


@register(
    "random",
    towers=(TOKENS, RESNET, MAP),
    ranges={"seed": "[0, 4294967295]"},
    summary="Baseline: uniform random maps (chance level for every metric)",
    citation="—",
    reference="—",
    defaults="uniform random maps, drawn per image from `seed`: chance level, for reading the other "
    "numbers",
)
def random_map(backend: Backend, images: torch.Tensor, texts: Texts, seed: int = 0) -> MapResult:
    """Uniform random maps, drawn per image from `seed` and the image's pixels: the same
    image gets the same maps alone or in any batch, different images different maps.

    seed: seed of the random generator.
    """
    h, w = backend.grid_size(images)
    maps = []
    for image in images:
        pixels = zlib.crc32(image.detach().float().cpu().numpy().tobytes())
        generator = torch.Generator().manual_seed(seed * 2**32 + pixels)
        maps.append(torch.rand(len(texts.prompts), h, w, generator=generator))
    return MapResult(torch.stack(maps))


@register(
    "attention",
    towers=(TOKENS, RESNET),
    needs={TOKENS: ("attention", "readout")},
    summary="The image's readout attention over the patches: the class token's in the last "
    "block, or the MAP probe's (text-agnostic)",
    citation="the free attention of Li et al. (ECLIP), 2022",
    reference="the ECLIP paper's free attention; clipviz.eclip.head.frozen_features",
    defaults="the class token's attention over the patches in the last block, heads averaged (MAP "
    "heads: the probe's; ResNets: the attention pool's mean query): ECLIP's free attention",
)
def attention_map(backend: Backend, images: torch.Tensor, texts: Texts) -> MapResult:
    """The global query's attention over the positions in the last attention layer (ViT:
    class token, mean over heads; RN: the attention pool's mean-token query) — ECLIP's
    "free attention". It ignores the text: the same map for every prompt."""
    feats = frozen_features(backend, images)
    h, w = backend.grid_size(images)
    maps = feats.free_attention.view(-1, 1, h, w).expand(-1, len(texts.prompts), h, w)
    return MapResult(maps.contiguous(), image_embeddings=feats.stock_embedding)
