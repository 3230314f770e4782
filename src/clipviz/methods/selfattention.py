"""Training-free dense maps from self-self attention: SCLIP, NACLIP and GEM.

Like MaskCLIP and ClearCLIP (`surgery.py`), each replaces the attention of the last block(s)
by one whose tokens attend to tokens like themselves (q-q plus k-k, k-k with a neighbourhood
prior, or iterated self-self attention), then reads every token through the stock head and
takes its cosine with the texts. The model is never modified: the new paths run the blocks'
own pieces through the shared kernels of `kernels.py` (GEM's path is CLIP Surgery's
`parallel_path`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..backend import Backend, Texts
from ..backend.towers import TOKENS
from ..errors import ClipvizError
from .kernels import QKV, cosine_maps, first_path_block, last_block_variant, parallel_path
from .registry import MapResult, register

GEM_BLOCKS = 6  # the reference's `gem_depth=7`: the GEM path runs in the last 6 blocks


# -- attention variants --------------------------------------------------------------------


def correlative_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """SCLIP's correlative self-attention per head: `(softmax(q qᵀ/√d) + softmax(k kᵀ/√d)) v`
    (the two attentions summed, not renormalised)."""
    return F.scaled_dot_product_attention(q, q, v) + F.scaled_dot_product_attention(k, k, v)


def neighbourhood_bias(grid: tuple[int, int], prefix: int, std: float) -> torch.Tensor:
    """NACLIP's Gaussian prior on the attention logits `[prefix + N, prefix + N]`:
    `exp(−|p − p′|² / (2 std²))` between patch positions `p, p′` of the `grid` (in patches),
    0 in the rows and columns of the prefix tokens."""
    h, w = grid
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    pos = torch.stack([rows.flatten(), cols.flatten()], dim=1).double()  # [N, 2]
    bias = torch.exp(-(torch.cdist(pos, pos) ** 2) / (2 * std**2))
    return F.pad(bias, (prefix, 0, prefix, 0)).float()


def neighbourhood_attention(k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """NACLIP's attention per head: `softmax(k kᵀ/√d + ω) v`."""
    logits = (k * k.shape[-1] ** -0.5) @ k.transpose(-2, -1) + bias.to(k.dtype)
    return logits.softmax(dim=-1) @ v


def self_self_attention(
    z: torch.Tensor, v: torch.Tensor, inverse_temperature: torch.Tensor, iterations: int
) -> torch.Tensor:
    """GEM's self-self attention of `z` (q, k or v) per head, `[B, heads, L, d]`: `iterations`
    times `z ← softmax(n(z) n(z)ᵀ τ) n(z)` (n: L2 normalisation over the head's channels), then
    `softmax(n(z) n(z)ᵀ τ) v`. inverse_temperature τ: `[B, 1, 1, 1]` (or a scalar).

    Each product is one fused attention with τ on its queries, `softmax((τ n(z)) n(z)ᵀ)`: the
    `[L, L]` probabilities are never materialised.
    """
    z = F.normalize(z, dim=-1)
    for _ in range(iterations):
        z = F.scaled_dot_product_attention(z * inverse_temperature, z, z, scale=1.0)
        z = F.normalize(z, dim=-1)
    return F.scaled_dot_product_attention(z * inverse_temperature, z, v, scale=1.0)


def gem_inverse_temperature(h: torch.Tensor, head_dim: int) -> torch.Tensor:
    """GEM's default τ per image, `[B, 1, 1, 1]`: the mean over all tokens (prefix included)
    of `‖h‖` over the full width, times `head_dim^-½` (h: the block's `ln_1` output)."""
    return (h.norm(dim=-1).mean(dim=-1) * head_dim**-0.5).view(-1, 1, 1, 1)


# -- methods -------------------------------------------------------------------------------


@register(
    "sclip",
    towers=(TOKENS,),
    needs={TOKENS: ("attention",)},
    summary="SCLIP: correlative self-attention (q-q plus k-k) in the last block, cosine",
    citation="Feng Wang, Jieru Mei, Alan Yuille: SCLIP: Rethinking Self-Attention for Dense "
    "Vision-Language Inference, ECCV 2024",
    reference="wangf3014/SCLIP, clip/model.py (VisionTransformer.forward, custom_attn with "
    "csa=True)",
    defaults="the last block: `(softmax(q qᵀ/√d) + softmax(k kᵀ/√d)) v` per head (a sum, not "
    "renormalised), residual and MLP kept (the reference's sliding window, logit scale 40 "
    "and PAMR are segmentation post-processing)",
)
def sclip(backend: Backend, images: torch.Tensor, texts: Texts) -> MapResult:
    """SCLIP: the last block's attention replaced by correlative self-attention, then ITSM.

    Last block: `y = x + ls_1(out_proj((softmax(q qᵀ/√d) + softmax(k kᵀ/√d)) v))`, then
    `y + ls_2(mlp(ln_2(y)))` (residual and MLP kept, as released), q, k, v from `ln_1(x)`;
    then `ln_post`, `proj`, normalise, cosine with the texts. The returned global embeddings
    are the stock ones.
    """
    vit = backend.vit

    def correlative_block(i: int, x: torch.Tensor, qkv: QKV) -> torch.Tensor:
        y = x + vit.attn_out(i, correlative_attention(*qkv))
        return y + vit.mlp(i, y)

    with torch.no_grad(), backend.autocast():
        tokens, stock = last_block_variant(vit, images, correlative_block)
    return cosine_maps(backend, images, texts, tokens, stock)


@register(
    "naclip",
    towers=(TOKENS,),
    ranges={"std": "[0.1, 1000]"},
    needs={TOKENS: ("attention",)},
    summary="NACLIP: k-k attention with a Gaussian neighbourhood prior in the last block, "
    "without residual or MLP, cosine",
    citation="Sina Hajimiri, Ismail Ben Ayed, Jose Dolz: Pay Attention to Your Neighbours: "
    "Training-Free Open-Vocabulary Semantic Segmentation, WACV 2025",
    reference="sinahmr/NACLIP, clip/model.py (VisionTransformer.custom_attn, attn 'naclip', "
    "arch 'reduced', gaussian_std 5)",
    defaults="the last block: `softmax(k kᵀ/√d + ω) v`, `ω = exp(−‖p − p′‖²/(2·5²))` over the patch "
    "grid, 0 for the class (and register) tokens; no residual, no MLP",
)
def naclip(backend: Backend, images: torch.Tensor, texts: Texts, std: float = 5.0) -> MapResult:
    """NACLIP: the last block reduced to neighbourhood-aware k-k attention, then ITSM.

    std: the Gaussian's standard deviation, in patches.

    Last block: `ls_1(out_proj(softmax(k kᵀ/√d + ω) v))` with k, v from `ln_1(x)`, no residual
    connection, no MLP, `ω` the Gaussian of the patch-grid distance (`neighbourhood_bias`);
    then `ln_post`, `proj`, normalise, cosine with the texts. The returned global embeddings
    are the stock ones.
    """
    if not std > 0:
        raise ClipvizError(f"naclip: std={std} must be positive (the reference uses 5)")
    vit = backend.vit
    grid = backend.grid_size(images)
    bias = backend.memo(
        ("naclip-bias", grid, vit.prefix, std),
        lambda: neighbourhood_bias(grid, vit.prefix, std).to(images.device),
    )

    def neighbourhood_block(i: int, x: torch.Tensor, qkv: QKV) -> torch.Tensor:
        return vit.attn_out(i, neighbourhood_attention(qkv[1], qkv[2], bias))

    with torch.no_grad(), backend.autocast():
        tokens, stock = last_block_variant(vit, images, neighbourhood_block)
    return cosine_maps(backend, images, texts, tokens, stock)


@register(
    "gem",
    towers=(TOKENS,),
    ranges={"depth": "[1, 256]", "iterations": "[0, 20]", "temperature": "(0, 1000]"},
    needs={TOKENS: ("attention",)},
    summary="GEM: iterated self-self (q-q, k-k, v-v) attention on a parallel path through the "
    "last 6 blocks, without MLP, cosine",
    citation="Walid Bousselham, Felix Petersen, Vittorio Ferrari, Hilde Kuehne: Grounding "
    "Everything: Emerging Localization Properties in Vision-Language Transformers, CVPR 2024",
    reference="WalBouss/GEM, gem/gem_utils.py (SelfSelfAttention, GEMResidualBlock, "
    "modified_vit_forward) and gem/gem_wrapper.py (GEMWrapper)",
    defaults="`gem_depth` 7 (the last 6 blocks carry the GEM path), 1 iteration, inverse temperature"
    " = mean token norm of `ln_1(x)` × `head_dim^-½` per image and block; the GEM path has "
    'no FFN; the reference embeds prompts as "a photo of a {}.": `--no-ensemble -p "a photo'
    ' of a dog."` does the same',
)
def gem(
    backend: Backend,
    images: torch.Tensor,
    texts: Texts,
    depth: int | None = None,
    iterations: int = 1,
    temperature: float | None = None,
) -> MapResult:
    """GEM: a parallel path of self-self attention through the last `depth` blocks, then ITSM.

    depth: how many of the last blocks carry the GEM path; None: the reference's 6
        (`gem_depth=7`), or every block of a shallower tower.
    iterations: self-self iterations per attention (the reference's `ss_attn_iter`).
    temperature: a fixed inverse temperature τ; None: per image and block, the mean token
        norm of `ln_1(x)` times `head_dim^-½`, as the reference.

    The stock stream `x` runs the stock blocks; the GEM stream starts equal to it at the first
    GEM block and, per block, adds `ls_1(out_proj(mean_z o_z))` for z ∈ {q, k, v} from
    `ln_1(x)` of the stock stream, `o_z = self_self_attention(z, v)`, with no MLP. Patch tokens
    come from the GEM stream through `ln_post` and `proj`; the global embeddings are the stock
    ones.
    """
    first = first_path_block(backend, depth, GEM_BLOCKS, "gem")
    if iterations < 0:
        raise ClipvizError(f"gem: iterations={iterations} must be 0 or more (the reference: 1)")

    def mean_self_self(i: int, h: torch.Tensor, qkv: QKV) -> torch.Tensor:
        q, k, v = qkv
        tau = (
            gem_inverse_temperature(h, q.shape[-1])
            if temperature is None
            else torch.full((len(h), 1, 1, 1), temperature, dtype=q.dtype, device=q.device)
        )
        # v's, k's and q's self-self attentions summed in the reference's order, then their
        # mean; three fused attentions over the B images take 0.7x the time of one over the
        # three stacked (measured on 2 CPU cores, ViT-B-16 shapes)
        mixed = self_self_attention(v, v, tau, iterations)
        mixed += self_self_attention(k, v, tau, iterations)
        mixed += self_self_attention(q, v, tau, iterations)
        return mixed / 3

    with torch.no_grad(), backend.autocast():
        tokens, stock = parallel_path(backend.vit, images, first, mean_self_self)
    return cosine_maps(backend, images, texts, tokens, stock)
