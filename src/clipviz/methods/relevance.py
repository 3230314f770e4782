"""Attention-gradient relevance of ViT blocks: GAE (Chefer et al.) and LeGrad.

Both take gradients of a CLIP similarity with respect to the attention probabilities of
blocks (computed explicitly: open_clip's fused attention never returns them), keep their
positive part and read the class token's row or every row. The shared gradient mechanism is
in `gradients.py`.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from ..backend import Backend, Texts, TokenTower
from ..backend.towers import TOKENS
from ..errors import ClipvizError
from ..maps import normalize_maps
from .gradients import block_index, check_grad_allowed, cosine, similarity_gradients, unit
from .registry import MapResult, register


def attention_graph(
    vit: TokenTower, images: Tensor, first: int, separate_blocks: bool = False
) -> tuple[list[Tensor], list[Tensor]]:
    """Attention probabilities `[B, heads, L, L]` and outputs `[B, L, W]` of blocks `first`…

    The blocks before `first` run without grad. `separate_blocks` cuts the residual stream
    between blocks, so that a target read after block `l` reaches block `l`'s attention but
    no earlier one (LeGrad's per-layer targets then share one backward).
    """
    check_grad_allowed("this method")
    with torch.no_grad():
        x = vit.run_blocks(vit.embed(images), stop=first)
    probs: list[Tensor] = []
    outputs: list[Tensor] = []
    for i in range(first, vit.depth):
        if separate_blocks or not outputs:
            x = x.detach().requires_grad_(True)
        x, p = vit.block_with_attention(i, x)
        probs.append(p)
        outputs.append(x)
    return probs, outputs


@register(
    "gae",
    towers=(TOKENS,),
    ranges={"start_layer": "[-256, 255]"},
    needs={TOKENS: ("attention", "class_token")},
    summary="Gradient-weighted attention relevance propagated through the ViT blocks",
    citation="Chefer, Gur and Wolf, Generic Attention-model Explainability for Interpreting "
    "Bi-Modal and Encoder-Decoder Transformers, ICCV 2021",
    reference="hila-chefer/Transformer-MM-Explainability, CLIP_explainability.ipynb, interpret",
    defaults="`start_layer = −1` (the last block), target `logit_scale · cos`",
)
def gae(
    backend: Backend,
    images: Tensor,
    texts: Texts,
    start_layer: int = -1,
    target: Literal["logit", "cosine"] = "logit",
) -> MapResult:
    """Chefer et al.'s relevance: `R = I`, `R += mean_heads(clamp(∇A ⊙ A, min=0)) @ R` per
    block from `start_layer`, map `R[0, 1:]` (the notebook's `interpret`).

    start_layer: first block whose attention is propagated (−1 = the last only, the
        reference's default; 0 = all; negative values count from the end).
    target: logit (`logit_scale · cos`, the reference's `logits_per_image`) or cosine; with
        several blocks the relevance is not scale-invariant, so the two differ.
    """
    vit = backend.vit
    first = block_index(start_layer, vit.depth, "start_layer", "gae")
    scale = backend.logit_scale if target == "logit" else 1.0
    with torch.enable_grad():
        with backend.autocast():
            probs, outputs = attention_graph(vit, images, first)
            embeddings = vit.pooled(outputs[-1])
        similarities = scale * cosine(embeddings, texts)
    attention = [p.detach().float() for p in probs]
    B, _, L, _ = attention[0].shape
    maps = []
    for grads in similarity_gradients(similarities, probs):
        # Only row 0 of R = (I + Ā_n)…(I + Ā_first) is read, so it is built as a row vector
        # from the last block back: O(L²) per block instead of O(L³), the same numbers.
        row = torch.zeros(B, 1, L, device=attention[0].device)
        row[:, 0, 0] = 1.0
        for a, g in zip(reversed(attention), reversed(grads), strict=True):
            cam = (g.float() * a).clamp(min=0).mean(dim=1)  # Ā [B, L, L]
            row = row + row @ cam
        maps.append(row[:, 0, vit.prefix :])
    h, w = backend.grid_size(images)
    maps_t = torch.stack(maps, dim=1).reshape(B, -1, h, w)
    return MapResult(maps_t, unit(embeddings))


@register(
    "legrad",
    towers=(TOKENS,),
    ranges={"layers": "[1, 256]", "correction_threshold": "[0, 1]"},
    needs={TOKENS: ("attention",)},
    summary="Positive gradients of per-layer similarities w.r.t. the last blocks' attention",
    citation="Bousselham, Boggust, Chaybouti, Strobelt and Kuehne, LeGrad: An Explainability "
    "Method for Vision Transformers via Feature Formation Sensitivity, ICCV 2025 "
    "(arXiv:2404.03214, 2024)",
    reference="WalBouss/LeGrad, legrad/wrapper.py, compute_legrad_clip",
    defaults="the last 2 blocks; each block's feature is the mean over **all** tokens (class token "
    "included) before `ln_post`/`proj`; MAP heads: the probe on each block's output, the "
    "gradient on the probe's attention, the empty-prompt correction (threshold 0.8)",
)
def legrad(
    backend: Backend,
    images: Tensor,
    texts: Texts,
    layers: int = 2,
    feature: Literal["mean", "class"] = "mean",
    correction: bool = True,
    correction_threshold: float = 0.8,
) -> MapResult:
    """LeGrad: `Σ_l mean_{heads, queries} ReLU(∂s_l/∂A_l)` over the last blocks, min-max.

    `s_l = cos(proj(ln_post(f_l)), text)` with `f_l` a feature of block `l`'s output `x_l`.
    Towers read by a MAP probe (SigLIP, PE-Core) follow `compute_legrad_siglip`: the probe
    runs on each block's output, and the gradient is taken on the probe's attention.
    layers: how many of the last blocks contribute.
    feature: mean (the mean over all tokens, class token included — the reference) or class
        (the model's own pooled token, `x_l[:, 0]` for class-token pooling).
    correction: MAP towers: zero the map where the empty prompt's own map (min-maxed) is
        above `correction_threshold`, as the reference does.
    correction_threshold: MAP towers: the empty prompt's level above which the map is zeroed.
    """
    vit = backend.vit
    if not 1 <= layers <= vit.depth:
        raise ClipvizError(
            f"legrad: layers={layers} must be between 1 and the tower's {vit.depth} blocks"
        )
    if vit.readout == "latent":
        return _legrad_probe(backend, images, texts, layers, correction, correction_threshold)
    with torch.enable_grad():
        with backend.autocast():
            probs, outputs = attention_graph(vit, images, vit.depth - layers, separate_blocks=True)
            if feature == "mean":
                embeddings = [vit.mean_embedding(x) for x in outputs]
            elif vit.readout == "class":
                embeddings = [vit.pooled(x) for x in outputs]
            else:
                raise ClipvizError(
                    f"legrad: feature=class needs a class token, and {backend.identity['model']} "
                    "pools its tokens otherwise; use feature=mean"
                )
        # Σ_l s_l: with the blocks separated, ∂/∂A_l of the sum is ∂s_l/∂A_l.
        similarities = torch.stack([cosine(e, texts) for e in embeddings]).sum(dim=0)
    maps = []
    for grads in similarity_gradients(similarities, probs):
        per_layer = [g.float().clamp(min=0).mean(dim=(1, 2))[:, vit.prefix :] for g in grads]
        maps.append(torch.stack(per_layer).sum(dim=0))  # [B, N]
    h, w = backend.grid_size(images)
    maps_t = normalize_maps(torch.stack(maps, dim=1).reshape(len(images), -1, h, w))
    with torch.no_grad(), backend.autocast():
        stock = vit.pooled(outputs[-1].detach())  # the model's own embedding, for scores
    return MapResult(maps_t, unit(stock))


EMPTY_PROMPT = "a photo of a"  # the reference's empty prompt for its correction


def _legrad_probe(
    backend: Backend,
    images: Tensor,
    texts: Texts,
    layers: int,
    correction: bool,
    threshold: float,
) -> MapResult:
    """`compute_legrad_siglip`: for each of the last `layers` blocks, the MAP probe (its MLP
    included, the trunk's final norm not) on the block's output; `s_l = cos(pooled, text)`;
    `ReLU(∂s_l/∂A_probe)` averaged over heads, the latent row; summed over the blocks. With
    `correction`, where the map of the empty prompt "a photo of a" (min-maxed) exceeds the
    threshold, the map is 0; then min-max."""
    vit = backend.readout_vit  # the probe reads the image
    extra = backend.encode_texts([EMPTY_PROMPT], ensemble=False).embeddings if correction else None
    targets = texts.embeddings if extra is None else torch.cat([texts.embeddings, extra])
    with torch.no_grad(), backend.autocast():  # gradients are taken at the probe only
        x = vit.run_blocks(vit.embed(images), stop=vit.depth - layers)
        outputs = []
        for i in range(vit.depth - layers, vit.depth):
            x = vit.run_block(i, x)
            outputs.append(x)
    with torch.enable_grad():
        with backend.autocast():
            probs, pooled = [], []
            for x in outputs:
                tokens = vit.pool_input(x, norm=False)
                p = vit.latent_probs(tokens).detach().requires_grad_(True)
                probs.append(p)
                pooled.append(vit.after_pool(vit.pool_from_probs(tokens, p)))
        similarities = torch.stack(
            [F.normalize(e.float(), dim=-1) @ targets.float().T for e in pooled]
        ).sum(dim=0)
    maps = []
    for grads in similarity_gradients(similarities, probs):
        per_layer = [vit.patch_columns(g.float().clamp(min=0).mean(dim=1)[:, 0]) for g in grads]
        maps.append(torch.stack(per_layer).sum(dim=0))  # [B, N]
    h, w = backend.grid_size(images)
    maps_t = torch.stack(maps, dim=1).reshape(len(images), -1, h, w)
    if extra is not None:
        empty = normalize_maps(maps_t[:, -1:])
        maps_t = maps_t[:, :-1].masked_fill(empty > threshold, 0.0)
    with torch.no_grad(), backend.autocast():
        stock = vit.pooled(outputs[-1].detach())
    return MapResult(normalize_maps(maps_t), unit(stock))
