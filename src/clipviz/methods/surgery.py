"""Training-free dense-token repairs of CLIP: CLIP Surgery, MaskCLIP and ClearCLIP.

All three replace the attention of the last block(s) by a path whose tokens keep their own
content (v-v, value-only or q-q attention), then read the tokens through the stock head
(`ln_post`, `proj`). The model is never modified: the paths run the blocks' own pieces
through the shared kernels of `kernels.py`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..backend import Backend, ResNetPoolTower, Texts
from ..backend.towers import RESNET, TOKENS
from ..errors import ClipvizError
from .kernels import (
    QKV,
    cosine_maps,
    first_path_block,
    last_block_variant,
    normalized,
    parallel_path,
    patch_maps,
)
from .kernels import stock_block as kernels_stock_block
from .registry import MapResult, register

SURGERY_DEPTH = 6  # the reference's v-v blocks: the last 6
# (q, k, v), each [B, heads, L, head_dim] -> mixed values [B, heads, L, head_dim]
Mixing = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


# -- attention variants --------------------------------------------------------------------


def vv_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """CLIP Surgery's v-v attention: `softmax(v v^T / sqrt(d)) v` per head."""
    return F.scaled_dot_product_attention(v, v, v)


def qq_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """ClearCLIP's q-q attention: `softmax(q q^T / sqrt(d)) v` per head."""
    return F.scaled_dot_product_attention(q, q, v)


def value_only(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """MaskCLIP's value path: every token attends only to itself."""
    return v


def pool_branch(rn: ResNetPoolTower, x: torch.Tensor, mix: Mixing) -> torch.Tensor:
    """ModifiedResNet's attention pool on `x` `[B, L, C]` with every position as a query and
    its attention replaced by `mix`: `c_proj(mix(q, k, v))` -> `[B, L, D]`."""
    return rn.pool_out(mix(*rn.pool_qkv(x)))


# -- shared pieces -------------------------------------------------------------------------


def feature_surgery(
    tokens: torch.Tensor,
    token0: torch.Tensor,
    text: torch.Tensor,
    redundant: torch.Tensor | None = None,
) -> torch.Tensor:
    """CLIP Surgery's feature surgery: similarities `[B, N, T]` with the features that are
    redundant across texts removed.

    tokens: unit spatial tokens `[B, N, D]`; token0: unit global embeddings `[B, D]`;
    text: unit text embeddings `[T, D]`.
    redundant: the embedding `r` (`[1, D]` or `[D]`) of the empty prompt "", embedded the way
        the prompts were. Given (the one-text case), `S = tokens @ (text - r).T`, not
        renormalised. Otherwise (needs `T >= 2`):
        `p = softmax(2 * token0 @ text.T)`, `w = p / mean_t(p)` (per image),
        `F[b,n,t,:] = tokens[b,n,:] * text[t,:] * w[b,t]`,
        `S[b,n,t] = sum_D (F[b,n,t,:] - mean_t F[b,n,t,:])`.
    The reference code broadcasts `w` for one image only (`B = 1`); here `w` is per image.
    `F` is never materialised (`[B, N, T, D]` is large): summing over `D` first gives the same
    `S = w_t * (tok . text_t) - mean_t' (w_t' * (tok . text_t'))`.
    """
    if redundant is not None:
        return tokens @ (text - redundant.reshape(1, -1)).T
    if text.shape[0] < 2:
        raise ClipvizError(
            "feature surgery with one text needs the empty-prompt embedding as `redundant`"
        )
    p = (2 * token0 @ text.T).softmax(dim=-1)  # [B, T]
    w = p / p.mean(dim=-1, keepdim=True)
    weighted = (tokens @ text.T) * w[:, None, :]  # [B, N, T]
    return weighted - weighted.mean(dim=-1, keepdim=True)


# -- methods -------------------------------------------------------------------------------


@register(
    "surgery",
    towers=(TOKENS, RESNET),
    ranges={"depth": "[1, 256]"},
    needs={TOKENS: ("attention",)},
    summary="CLIP Surgery: v-v attention in the last blocks plus feature surgery across the texts",
    citation="Yi Li, Hualiang Wang, Yiqun Duan, Jiheng Zhang, Xiaomeng Li: A Closer Look at the "
    "Explainability of Contrastive Language-Image Pre-training, Pattern Recognition 162, 2025 "
    "(arXiv:2304.05653, 2023, first titled CLIP Surgery for Better Explainability with "
    "Enhancement in Open-Vocabulary Tasks)",
    reference="xmed-lab/CLIP_Surgery, clip/clip_surgery_model.py (VisionTransformer.forward, "
    "Attention) and clip/clip.py clip_feature_surgery",
    defaults="v-v attention in the last 6 blocks, the original path for the class token, feature "
    "surgery; one prompt: minus the empty prompt's embedding; batched with per-image text "
    "weights (the reference handles one image)",
)
def surgery(
    backend: Backend, images: torch.Tensor, texts: Texts, depth: int | None = None
) -> MapResult:
    """CLIP Surgery: v-v attention in the last `depth` blocks, then feature surgery.

    depth: how many of the last blocks get the v-v path (ViT; 1 … number of blocks); None:
        the reference's 6, or every block of a shallower tower.

    ViT: from the last `depth` blocks on two paths run. The original path is the stock block.
    The new one, per block, adds `ls_1(out_proj(vv_attention(ln_1(x_orig_in))))` and no MLP,
    starting from the residual stream at the first surgery block. Patch tokens come from the
    new path, the global embedding (token 0, which weights the texts) from the original one;
    both go through `ln_post` and `proj`.
    RN: the attention pool with q = k = v = the `v_proj` output, every position a query, then
    `c_proj` (no key normalisation or temperature: the reference builds its ResNet pool
    without them). Token 0 is the stock pool's (the reference's ResNet "original path" is
    the v-v path too; we weight the texts by the model's own global embedding, as for ViTs).
    One text: the empty prompt "" (embedded with the same ensemble setting) is subtracted.
    """
    with torch.no_grad():
        with backend.autocast():
            if backend.tower == TOKENS:
                first = first_path_block(backend, depth, SURGERY_DEPTH, "surgery")
                tokens, token0 = parallel_path(
                    backend.vit, images, first, lambda i, h, qkv: vv_attention(*qkv)
                )
            else:
                rn = backend.rn
                x = rn.pool_inputs(rn.features(images))
                tokens = normalized(pool_branch(rn, x, vv_attention))[:, 1:]
                token0 = normalized(rn.pooled(x))
        redundant = None
        if len(texts.prompts) == 1:
            redundant = backend.encode_texts([""], ensemble=texts.ensemble).embeddings.float()
        sim = feature_surgery(tokens, token0, texts.embeddings.float(), redundant)
    return MapResult(patch_maps(sim, backend.grid_size(images)), image_embeddings=token0)


@register(
    "maskclip",
    towers=(TOKENS, RESNET),
    needs={TOKENS: ("attention",)},
    summary="MaskCLIP: the last attention's value path (no query-key mixing), cosine with the text",
    citation="Chong Zhou, Chen Change Loy, Bo Dai: Extract Free Dense Labels from CLIP, ECCV 2022",
    reference="chongzhou96/MaskCLIP, mmseg/models/backbones/vit.py (last layer, v path) and "
    "mmseg/models/decode_heads/maskclip_head.py",
    defaults="the last block's value path with its residual and MLP, as released; RN: "
    "`c_proj(v_proj(layer4))` without positions",
)
def maskclip(backend: Backend, images: torch.Tensor, texts: Texts) -> MapResult:
    """MaskCLIP: the last attention's value path in place of its attention, then ITSM.

    ViT (as MaskCLIP's released ViT backbone): the last block with each token attending only
    to itself, residual and MLP kept, `y = x + ls_1(out_proj(v(ln_1(x))))`,
    `y + ls_2(mlp(ln_2(y)))`; then `ln_post`, `proj`, normalise, cosine with the texts.
    RN (as MaskCLIP's ResNet head): `c_proj(v_proj(f))` at every position of the `layer4`
    features `f` (1x1 convolutions: no positional embedding, no mean token), normalised.
    The returned global embeddings are the stock ones.
    """
    with torch.no_grad(), backend.autocast():
        if backend.tower == TOKENS:
            vit = backend.vit

            def value_block(i: int, x: torch.Tensor, qkv: QKV) -> torch.Tensor:
                y = x + vit.attn_out(i, value_only(*qkv))
                return y + vit.mlp(i, y)

            tokens, stock = last_block_variant(vit, images, value_block)
        else:
            rn = backend.rn
            features = rn.features(images)
            tokens = normalized(rn.value_tokens(features))
            stock = normalized(rn.pooled(rn.pool_inputs(features)))
    return cosine_maps(backend, images, texts, tokens, stock)


@register(
    "clearclip",
    towers=(TOKENS,),
    needs={TOKENS: ("attention",)},
    summary="ClearCLIP: last block reduced to q-q attention without residual or MLP, cosine",
    citation="Mengcheng Lan, Chaofeng Chen, Yiping Ke, Xinjiang Wang, Litong Feng, Wayne Zhang: "
    "ClearCLIP: Decomposing CLIP Representations for Dense Vision-Language Inference, ECCV 2024",
    reference="mc-lan/ClearCLIP, open_clip/transformer.py (the last block's custom "
    "attention: q-q, no residual, no FFN) and clearclip_segmentor.py",
    defaults="q-q attention, no residual, no FFN in the last block",
)
def clearclip(backend: Backend, images: torch.Tensor, texts: Texts) -> MapResult:
    """ClearCLIP: the last block reduced to q-q attention, then ITSM (ViT only).

    Last block: `ls_1(out_proj(softmax(q q^T / sqrt(d)) v))` with q, v from `ln_1(x)`, no
    residual connection, no MLP; then `ln_post`, `proj`, normalise, cosine with the texts.
    The returned global embeddings are the stock ones.
    """
    vit = backend.vit

    def qq_block(i: int, x: torch.Tensor, qkv: QKV) -> torch.Tensor:
        return vit.attn_out(i, qq_attention(*qkv))

    with torch.no_grad(), backend.autocast():
        tokens, stock = last_block_variant(vit, images, qq_block)
    return cosine_maps(backend, images, texts, tokens, stock)


# the kernels under the names method modules written before `kernels.py` import from here
# (selfattention, gradeclip, scclip, resclip, sfp); new code imports `kernels`
_itsm, _unit, _vit_last_block_variant = cosine_maps, normalized, last_block_variant
stock_block = kernels_stock_block
