"""SFP: feature purification that stops anomalous tokens from spreading, a sibling of SC-CLIP
(`scclip.py`) that finds the anomalous patches by attention and reads the last block with
three attentions.

A patch is anomalous when the class token attends to it (scaled) more than the patch attends
to itself, in the second-to-last block; the ten strongest are replaced by the mean of their
neighbours. The last block's attention is the mean of k-k, q-q and a softmax over an
intermediate block's thresholded patch affinity, without residual or MLP, plus a share of the
class token; the sum of several intermediate blocks goes through the affinity softmax alone;
both are aggregated by another block's patch affinity.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..backend import Backend, Texts
from ..backend.towers import TOKENS
from ..errors import ClipvizError
from .kernels import QKV
from .registry import MapResult, register
from .scclip import (
    affinity_attention,
    chosen_blocks,
    fill_from_neighbours,
    fused_last_block,
    patch_affinity,
    scaled_blocks,
)
from .surgery import _itsm

# the reference's block indices, fixed in its forward for every model size:
# (pre_adjust, post_adjust, multi_start, multi_end)
REFERENCE_BLOCKS: tuple[int, int, int, int] = (8, 3, 3, 10)
RES_SCALE = 5.0  # the reference's `res_scale`: the class row is scaled by res_cls · res_scale


def salient_outliers(probs: torch.Tensor, prefix: int, scale: float, count: int) -> torch.Tensor:
    """SFP's anomalous patches `[B, N]` from a block's attention `[B, heads, L, L]`: heads
    averaged, the patches whose class-token attention times `scale` exceeds their attention
    to themselves, the `count` largest of those."""
    a = probs.float().mean(dim=1)
    from_cls = a[:, 0, prefix:] * scale
    to_self = a[:, prefix:, prefix:].diagonal(dim1=1, dim2=2)
    score = from_cls.masked_fill(from_cls <= to_self, float("-inf"))
    top = score.topk(min(count, score.shape[1]), dim=1)
    mask = torch.zeros_like(score, dtype=torch.bool)
    return mask.scatter_(1, top.indices, top.values > float("-inf"))


def purified_attention(
    affinity: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> torch.Tensor:
    """SFP's last-block attention per head: `⅓ (softmax(k kᵀ/√d) + softmax(q qᵀ/√d) +
    softmax(m)) v`, m as in `affinity_attention`."""
    kk = F.scaled_dot_product_attention(k, k, v)
    qq = F.scaled_dot_product_attention(q, q, v)
    return (kk + qq + affinity_attention(affinity, v)) / 3


@register(
    "sfp",
    towers=(TOKENS,),
    ranges={
        "pre_adjust": "[0, 255]",
        "post_adjust": "[0, 255]",
        "multi_start": "[0, 255]",
        "multi_end": "[1, 256]",
        "res_cls": "[0, 10]",
        "beta": "[-1, 1]",
        "outliers": "[0, 1000]",
    },
    needs={TOKENS: ("attention", "class_token")},
    summary="SFP: attention-salient tokens filled from neighbours, last block as k-k, q-q and "
    "affinity attention, multi-level features, affinity aggregation, cosine",
    citation="Shuo Jin, Siyue Yu, Bingfeng Zhang, Mingjie Sun, Yi Dong, Jimin Xiao: Feature "
    "Purification Matters: Suppressing Outlier Propagation for Training-Free Open-Vocabulary "
    "Semantic Segmentation, ICCV 2025",
    reference="Kimsure/SFP, SFP_ICCV/clip/model.py (VisionTransformer.forward with pm 'SOM', "
    "custom_attn, sinkhorn_attn, mean_interpolation, adaptively_aggregate)",
    defaults="blocks 8 (pre), 3 (post), 3-9 (multi-level) for every tower deep enough, as the "
    "reference fixes them (shallower towers: scaled); res_cls 0.3 (class-token scale 1.5 in "
    "the outlier test), beta 0.4, 10 outliers; per image (the reference handles one)",
)
def sfp(
    backend: Backend,
    images: torch.Tensor,
    texts: Texts,
    pre_adjust: int | None = None,
    post_adjust: int | None = None,
    multi_start: int | None = None,
    multi_end: int | None = None,
    res_cls: float = 0.3,
    beta: float = 0.4,
    outliers: int = 10,
) -> MapResult:
    """SFP: purified last block with multi-level fusion, then ITSM.

    pre_adjust: the block whose (filled, thresholded) patch affinity aggregates the last
        block's input and forms its attention (0-based, below the last block).
    post_adjust: the block whose thresholded patch affinity aggregates the outputs.
    multi_start: the first block of the multi-level sum.
    multi_end: the block after the last of the multi-level sum.
    res_cls: the share of the class token added after the last block; times 5, the scale of
        the class token's attention in the outlier test.
    beta: affinities below it are set to 0.
    outliers: at most this many anomalous patches are filled.

    With `x` the stream after all blocks but the last: its patches with the anomalous ones
    filled, aggregated by the pre_adjust affinity `a`, go through the last block's
    `attn_out(purified_attention)` (q, k, v from `ln_1`, no residual, no MLP) plus
    `res_cls ·` its class token, then are aggregated by the post_adjust affinity; the sum of
    the block outputs multi_start … multi_end−1 goes through `attn_out(affinity_attention)`
    plus `res_cls ·` its class token, is aggregated the same way and added. `ln_post`,
    `proj`, normalise, cosine with the texts. Global embeddings: stock.
    """
    vit = backend.vit
    last = vit.depth - 1
    if last < 1:
        raise ClipvizError(f"sfp: {backend.identity['model']} has one block; it needs two")
    blocks = REFERENCE_BLOCKS
    if blocks[3] > last:  # a shallow tower: the reference's blocks scaled to its depth
        blocks = scaled_blocks(blocks, vit.depth)
    pre_adjust, post_adjust, multi_start, multi_end = chosen_blocks(
        "sfp", backend, blocks, (pre_adjust, post_adjust, multi_start, multi_end)
    )
    grid = backend.grid_size(images)
    prefix = vit.prefix
    with torch.no_grad(), backend.autocast():
        outputs = []  # block outputs 0 … last-1
        x = vit.embed(images)
        for i in range(last - 1):
            x = vit.run_block(i, x)
            outputs.append(x)
        x, probs = vit.block_with_attention(last - 1, x)
        outputs.append(x)
        anomalous = salient_outliers(probs, prefix, res_cls * RES_SCALE, outliers)
        patches = fill_from_neighbours(x[:, prefix:], anomalous, grid)
        before = patch_affinity(
            fill_from_neighbours(outputs[pre_adjust][:, prefix:], anomalous, grid)
        )
        before = torch.where(before < beta, torch.zeros_like(before), before)
        after = patch_affinity(outputs[post_adjust][:, prefix:])

        def attention(qkv: QKV, own: bool) -> torch.Tensor:
            # the stream's own patches: purified; the multi-level sum: the affinity alone
            return purified_attention(before, *qkv) if own else affinity_attention(before, qkv[2])

        tokens, stock = fused_last_block(
            vit, x, outputs, patches, before, after, (multi_start, multi_end), beta, res_cls,
            attention,
        )  # fmt: skip
    return _itsm(backend, images, texts, tokens, stock)
