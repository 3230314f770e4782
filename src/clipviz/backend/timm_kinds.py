"""The timm classes clipviz reproduces, each admitted by its exact type: a subclass, or another
module in the same place (timm's `DiffAttention` in a `Block`), may compute something else,
and recomputing it as plain softmax attention would give silently wrong maps.

One list, here: the trunks by how they are read, the blocks and attention modules whose
attention is recomputed, the last-stage blocks read as tokens, and the attention-pool probe
read as a MAP head.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass


@dataclass(frozen=True)
class TimmKinds:
    """timm classes by role (sets of exact types)."""

    vits: frozenset[type]  # trunks read as a token stream with blocks
    relpos_vits: frozenset[type]  # the same, with a relative position bias in every block
    maps: frozenset[type]  # trunks that pool a feature map
    pre_norm: frozenset[type]  # blocks: norm, then attention or MLP, then the residual
    post_norm: frozenset[type]  # blocks: attention or MLP, then norm, then the residual
    attention: frozenset[type]  # softmax(q·kᵀ/√d + bias)·v, then `norm`, `proj`
    stage_blocks: frozenset[type]  # last-stage blocks attending over the whole map
    stage_attention: frozenset[type]  # their attention modules
    probe: type  # the MAP head's attention pool (one learned query set)

    @property
    def attention_names(self) -> str:
        return ", ".join(sorted(k.__name__ for k in self.attention))


@functools.cache
def timm_kinds() -> TimmKinds:
    """The classes of the installed timm (imported on first use)."""
    from timm.layers import Attention, AttentionPoolLatent, AttentionRope
    from timm.models.convnext import ConvNeXt
    from timm.models.eva import Eva, EvaAttention, EvaBlock, EvaBlockPostNorm
    from timm.models.fastvit import Attention as FastVitAttention
    from timm.models.fastvit import AttentionBlock, FastVit
    from timm.models.swin_transformer import (
        SwinTransformer,
        SwinTransformerBlock,
        WindowAttention,
    )
    from timm.models.vision_transformer import Block, ResPostBlock, VisionTransformer
    from timm.models.vision_transformer_relpos import (
        RelPosAttention,
        RelPosBlock,
        ResPostRelPosBlock,
        VisionTransformerRelPos,
    )

    return TimmKinds(
        vits=frozenset({VisionTransformer, Eva}),
        relpos_vits=frozenset({VisionTransformerRelPos}),
        maps=frozenset({ConvNeXt, FastVit, SwinTransformer}),
        pre_norm=frozenset({Block, EvaBlock, RelPosBlock}),
        post_norm=frozenset({EvaBlockPostNorm, ResPostBlock, ResPostRelPosBlock}),
        attention=frozenset({Attention, AttentionRope, EvaAttention, RelPosAttention}),
        stage_blocks=frozenset({AttentionBlock, SwinTransformerBlock}),
        stage_attention=frozenset({FastVitAttention, WindowAttention}),
        probe=AttentionPoolLatent,
    )
