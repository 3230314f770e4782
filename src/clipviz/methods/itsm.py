"""ITSM — Image-Text Similarity Map (Li et al., ECLIP paper).

`S = tokens[:, 1:] @ text.T`, reshaped to `[B, T, h, w]`: the cosine of every projected
patch token with each text embedding.
"""

from __future__ import annotations

import torch

from ..backend import Backend, Texts
from ..backend.towers import MAP, RESNET, TOKENS
from .kernels import similarity_maps
from .registry import MapResult, register


@register(
    "itsm",
    towers=(TOKENS, RESNET, MAP),
    summary="Image-Text Similarity Map: cosine of every projected patch token with the text",
    citation="Li et al., Exploring Visual Interpretability for CLIP (ECLIP), arXiv:2209.07046, 2022",
    reference="the paper's formula (no released code); ViT: last block → ln_post → proj, "
    "RN: the attention pool with every position as a query",
    defaults="the paper's formula: ViT: the last block → `ln_post` → `proj` for every token; RN: the"
    " attention pool with every position as a query; cosine with the text",
)
def itsm(backend: Backend, images: torch.Tensor, texts: Texts) -> MapResult:
    """ITSM: the cosine of every projected patch token with each text."""
    tokens = backend.dense_tokens(images)  # [B, 1+N, D], unit length
    maps = similarity_maps(tokens[:, 1:], texts.embeddings, backend.grid_size(images))
    return MapResult(maps, image_embeddings=tokens[:, 0])
