"""Attention rollout (Abnar & Zuidema, "Quantifying Attention Flow in Transformers", ACL 2020).

Per block, the head-averaged attention `Ā` with the residual connection added and rows
renormalised, `Â = (Ā + I) / rowsum(Ā + I)`; the rollout is the product from the first block
on, `R = Â_n ⋯ Â_first`, and the map is the class token's row over the patches, `R[0, 1:]`.
It ignores the text: the same map for every prompt.
"""

from __future__ import annotations

import torch

from ..backend import Backend, Texts
from ..backend.towers import TOKENS
from .gradients import block_index
from .registry import MapResult, register


@register(
    "rollout",
    towers=(TOKENS,),
    ranges={"start_layer": "[-256, 255]"},
    needs={TOKENS: ("attention", "class_token")},
    summary="Attention rollout: head-averaged attention with the residual, multiplied through "
    "the blocks (text-agnostic)",
    citation="Samira Abnar and Willem Zuidema, Quantifying Attention Flow in Transformers, "
    "ACL 2020",
    reference="samiraabnar/attention_flow, attention_graph_util.py, compute_joint_attention",
    defaults="every block, residual added and rows renormalised, heads averaged",
)
def rollout(
    backend: Backend,
    images: torch.Tensor,
    texts: Texts,
    start_layer: int = 0,
    residual: bool = True,
) -> MapResult:
    """Attention rollout from block `start_layer` to the last.

    start_layer: the first block multiplied in (0 = all; negative values count from the end).
    residual: add the identity for the residual connection and renormalise the rows (the
        reference's `add_residual`); False multiplies the raw head-averaged attention.
    """
    vit = backend.vit
    first = block_index(start_layer, vit.depth, "start_layer", "rollout")
    with torch.no_grad(), backend.autocast():
        x = vit.run_blocks(vit.embed(images), stop=first)
        rollout = None
        for i in range(first, vit.depth):
            x, probs = vit.block_with_attention(i, x)
            a = probs.float().mean(dim=1)  # Ā [B, L, L]
            if residual:
                a = a + torch.eye(a.shape[-1], device=a.device)
                a = a / a.sum(dim=-1, keepdim=True)
            rollout = a if rollout is None else a @ rollout
        stock = vit.pooled(x)
    assert rollout is not None  # at least one block
    h, w = backend.grid_size(images)
    maps = rollout[:, 0, vit.prefix :].reshape(-1, 1, h, w).expand(-1, len(texts.prompts), h, w)
    return MapResult(maps.contiguous(), image_embeddings=stock.float())
