"""Training-free dense-token repairs of CLIP: CLIP Surgery, MaskCLIP and ClearCLIP.

All three replace the attention of the last block(s) by a path whose tokens keep their own
content (v-v, value-only or q-q attention), then read the tokens through the stock head
(`ln_post`, `proj`). The model is never modified: the new paths call the blocks' own
submodules (`ln_1`, the `in_proj` of the attention, `out_proj`, `ls_1`, `mlp`) on the side.

`SURGERY_METHODS` describes the methods for the registry in `clipviz.methods`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from ..backend import Backend, Texts
from ..errors import ClipvizError
from . import MapResult, Method

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


def attention_branch(backend: Backend, block: Any, x: torch.Tensor, mix: Mixing) -> torch.Tensor:
    """`block`'s attention branch on the residual stream `x` `[B, L, W]` with its attention
    replaced by `mix`: `ls_1(out_proj(mix(q, k, v)))`, q/k/v from `ln_1(x)`.

    `ls_1` (layer scale, identity in CLIP's own models) applies as in the stock block, so the
    branch is what the block would add to the residual stream.
    """
    q, k, v = backend.attention_qkv(block, block.ln_1(x))
    return block.ls_1(backend.attention_out(block, mix(q, k, v)))


def pool_branch(backend: Backend, x: torch.Tensor, mix: Mixing) -> torch.Tensor:
    """ModifiedResNet's attention pool on `x` `[B, L, C]` with every position as a query and
    its attention replaced by `mix`: `c_proj(mix(q, k, v))` -> `[B, L, D]`."""
    pool = backend.visual.attnpool
    B, L, C = x.shape
    heads = pool.num_heads

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.view(B, L, heads, C // heads).transpose(1, 2)

    out = mix(split(pool.q_proj(x)), split(pool.k_proj(x)), split(pool.v_proj(x)))
    return pool.c_proj(out.transpose(1, 2).reshape(B, L, C))


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


def _maps(similarity: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """`[B, N, T]` -> `[B, T, h, w]` float32."""
    B, _, T = similarity.shape
    return similarity.transpose(1, 2).reshape(B, T, *grid).float()


def _unit(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.float(), dim=-1)


def _vit_stream(backend: Backend, images: torch.Tensor, blocks: list[Any]) -> torch.Tensor:
    """The residual stream `[B, 1+N, W]` after the stock `blocks` (the first ones)."""
    x = backend.vit_embed(images)
    for block in blocks:
        x = backend.run_block(block, x)
    return x


def _vit_last_block_variant(
    backend: Backend, images: torch.Tensor, tokens_of: Callable[[Any, torch.Tensor], torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit patch tokens `[B, N, D]` from `tokens_of(last_block, x)` in place of the last
    block, and the stock global embeddings `[B, D]`."""
    *first, last = backend.vit_blocks()
    x = _vit_stream(backend, images, first)
    tokens = _unit(backend.vit_head(tokens_of(last, x)))[:, 1:]
    stock = _unit(backend.vit_head(backend.run_block(last, x)))[:, 0]
    return tokens, stock


def _itsm(
    backend: Backend, images: torch.Tensor, texts: Texts, tokens: torch.Tensor, stock: torch.Tensor
) -> MapResult:
    """Cosine of unit tokens `[B, N, D]` with the texts, in float32 outside autocast."""
    sim = tokens @ texts.embeddings.float().T  # [B, N, T]
    return MapResult(_maps(sim, backend.grid_size(images)), image_embeddings=stock)


# -- methods -------------------------------------------------------------------------------


def surgery(backend: Backend, images: torch.Tensor, texts: Texts, depth: int = 6) -> MapResult:
    """CLIP Surgery: v-v attention in the last `depth` blocks, then feature surgery.

    ViT: from the last `depth` blocks on (clamped to the number of blocks) two paths run. The
    original path is the stock block. The new one, per block, adds
    `ls_1(out_proj(vv_attention(ln_1(x_orig_in))))` and no MLP, starting from the residual
    stream at the first surgery block. Patch tokens come from the new path, the global
    embedding (token 0, which weights the texts) from the original one; both go through
    `ln_post` and `proj`.
    RN: the attention pool with q = k = v = the `v_proj` output, every position a query, then
    `c_proj` (no key normalisation or temperature: the reference builds its ResNet pool
    without them). Token 0 is the stock pool's (the reference's ResNet "original path" is
    the v-v path too; we weight the texts by the model's own global embedding, as for ViTs).
    One text: the empty prompt "" (embedded with the same ensemble setting) is subtracted.
    """
    if depth < 1:
        raise ClipvizError(f"--depth must be at least 1 (got {depth}): the number of last blocks")
    with torch.no_grad():
        with backend.autocast():
            if backend.tower == "vit":
                blocks = backend.vit_blocks()
                depth = min(depth, len(blocks))
                x = _vit_stream(backend, images, blocks[:-depth])
                x_new = x
                for block in blocks[-depth:]:
                    x_new = x_new + attention_branch(backend, block, x, vv_attention)
                    x = backend.run_block(block, x)
                tokens = _unit(backend.vit_head(x_new))[:, 1:]
                token0 = _unit(backend.vit_head(x))[:, 0]
            else:
                x = backend.rn_pool_inputs(backend.rn_features(images))
                tokens = _unit(pool_branch(backend, x, vv_attention))[:, 1:]
                token0 = _unit(backend.rn_attention_pool(x))[:, 0]
        redundant = None
        if len(texts.prompts) == 1:
            redundant = backend.encode_texts([""], ensemble=texts.ensemble).embeddings.float()
        sim = feature_surgery(tokens, token0, texts.embeddings.float(), redundant)
    return MapResult(_maps(sim, backend.grid_size(images)), image_embeddings=token0)


def maskclip(backend: Backend, images: torch.Tensor, texts: Texts) -> MapResult:
    """MaskCLIP: the last attention's value path in place of its attention, then ITSM.

    ViT (as MaskCLIP's released ViT backbone): the last block with each token attending only
    to itself, residual and MLP kept, `y = x + ls_1(out_proj(v(ln_1(x))))`,
    `y + ls_2(mlp(ln_2(y)))`; then `ln_post`, `proj`, normalise, cosine with the texts.
    RN (as MaskCLIP's ResNet head): `c_proj(v_proj(f))` at every position of the `layer4`
    features `f` (1x1 convolutions: no positional embedding, no mean token), normalised.
    The returned global embeddings are the stock ones.
    """

    def value_block(block: Any, x: torch.Tensor) -> torch.Tensor:
        y = x + attention_branch(backend, block, x, value_only)
        return y + block.ls_2(block.mlp(block.ln_2(y)))

    with torch.no_grad(), backend.autocast():
        if backend.tower == "vit":
            tokens, stock = _vit_last_block_variant(backend, images, value_block)
        else:
            features = backend.rn_features(images)
            pool = backend.visual.attnpool
            tokens = _unit(pool.c_proj(pool.v_proj(features.flatten(2).transpose(1, 2))))
            stock = _unit(backend.rn_attention_pool(backend.rn_pool_inputs(features)))[:, 0]
    return _itsm(backend, images, texts, tokens, stock)


def clearclip(backend: Backend, images: torch.Tensor, texts: Texts) -> MapResult:
    """ClearCLIP: the last block reduced to q-q attention, then ITSM (ViT only).

    Last block: `ls_1(out_proj(softmax(q q^T / sqrt(d)) v))` with q, v from `ln_1(x)`, no
    residual connection, no MLP; then `ln_post`, `proj`, normalise, cosine with the texts.
    The returned global embeddings are the stock ones.
    """
    if backend.tower != "vit":
        raise ClipvizError(
            "clearclip is defined for ViT towers; use maskclip or surgery for ResNets"
        )

    def qq_block(block: Any, x: torch.Tensor) -> torch.Tensor:
        return attention_branch(backend, block, x, qq_attention)

    with torch.no_grad(), backend.autocast():
        tokens, stock = _vit_last_block_variant(backend, images, qq_block)
    return _itsm(backend, images, texts, tokens, stock)


SURGERY_METHODS: tuple[Method, ...] = (
    Method(
        "surgery",
        surgery,
        "CLIP Surgery: v-v attention in the last blocks plus feature surgery across the texts",
        "Yi Li, Hualiang Wang, Yiqun Duan, Jiheng Zhang, Xiaomeng Li: A Closer Look at the "
        "Explainability of Contrastive Language-Image Pre-training, Pattern Recognition 162, "
        "2025 (arXiv:2304.05653, 2023, first titled CLIP Surgery for Better Explainability "
        "with Enhancement in Open-Vocabulary Tasks)",
        towers=("vit", "rn"),
        options=("depth",),
    ),
    Method(
        "maskclip",
        maskclip,
        "MaskCLIP: the last attention's value path (no query-key mixing), cosine with the text",
        "Chong Zhou, Chen Change Loy, Bo Dai: Extract Free Dense Labels from CLIP, ECCV 2022",
        towers=("vit", "rn"),
    ),
    Method(
        "clearclip",
        clearclip,
        "ClearCLIP: last block reduced to q-q attention without residual or MLP, cosine",
        "Mengcheng Lan, Chaofeng Chen, Yiping Ke, Xinjiang Wang, Litong Feng, Wayne Zhang: "
        "ClearCLIP: Decomposing CLIP Representations for Dense Vision-Language Inference, "
        "ECCV 2024",
        towers=("vit",),
    ),
)
