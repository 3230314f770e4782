"""Grad-ECLIP: the gradient of the image-text cosine at the attention output of the pooled
token, times the values, weighted by the query-key similarity of the pooled token.

As the authors' notebooks compute it, the explained blocks run their attention as one head
over the full width (scale `W^-½`), and that forward is the one whose cosine is explained.
The same formula explains the text side: the importance of each prompt token for the
image-text cosine, read at the end-of-text token of the last text blocks.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..backend import Backend, Texts
from ..backend.text_tower import TextTower
from ..errors import ClipvizError
from .gradients import check_grad_allowed, cosine, similarity_gradients, unit
from .registry import MapResult, register


def _full_width(t: Tensor) -> Tensor:
    """Per-head `[B, heads, L, d]` -> one head over the full width `[B, L, heads·d]`."""
    B, H, L, d = t.shape
    return t.transpose(1, 2).reshape(B, L, H * d)


def one_head_block(
    tower: Any, i: int, x: Tensor, mask: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Block `i` of `tower` (any adapter giving `norm1`, `qkv`, `attn_out`, `mlp` by index)
    with its attention as one head over the full width, as the reference runs it:
    `a = softmax(q kᵀ/√W + mask) v`, `y = x + out_proj(a)`, `y + mlp(ln_2(y))`.

    Returns `y` and the full-width `a`, `q`, `k`, `v` `[B, L, W]` (`a` requires grad).
    """
    q, k, v = tower.qkv(i, tower.norm1(i, x))
    heads = q.shape[1]
    q, k, v = _full_width(q), _full_width(k), _full_width(v)
    logits = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    if mask is not None:
        logits = logits + mask.to(logits.dtype)
    a = logits.softmax(dim=-1) @ v
    if not a.requires_grad:  # the first explained block: its input carries no graph
        a.requires_grad_(True)
    B, L, W = a.shape
    y = x + tower.attn_out(i, a.view(B, L, heads, W // heads).transpose(1, 2))
    return y + tower.mlp(i, y), a, q, k, v


def key_similarity(q: Tensor, k: Tensor, index: int, keys: slice) -> Tensor:
    """`cos(q[index], k_j)` over the `keys` positions, min-max normalised: `[B, J]`."""
    s = (F.normalize(q[:, index : index + 1], dim=-1) * F.normalize(k[:, keys], dim=-1)).sum(-1)
    lo, hi = s.min(dim=1, keepdim=True).values, s.max(dim=1, keepdim=True).values
    return (s - lo) / (hi - lo)


def _check_layers(layers: int, depth: int, what: str) -> None:
    if not 1 <= layers <= depth:
        raise ClipvizError(f"gradeclip: {what}={layers} is outside 1…{depth}, the tower's blocks")


def _image_maps(
    backend: Backend, images: Tensor, texts: Texts, layers: int, use_keys: bool
) -> tuple[Tensor, Tensor]:
    """Maps `[B, T, h, w]` and the stock image embeddings `[B, D]` (the stock blocks run
    from the input the explained ones share)."""
    vit = backend.vit
    _check_layers(layers, vit.depth, "layers")
    first = vit.depth - layers
    patches = slice(vit.prefix, None)
    with torch.no_grad(), backend.autocast():
        x = vit.run_blocks(vit.embed(images), stop=first)
        stock = vit.pooled(vit.run_blocks(x, start=first))
    reads, weights, values = [], [], []
    with torch.enable_grad(), backend.autocast():
        for i in range(first, vit.depth):
            x, a, q, k, v = one_head_block(vit, i, x)
            reads.append(a)
            values.append(v[:, patches].detach().float())  # [B, N, W]
            sim = key_similarity(q.detach().float(), k.detach().float(), 0, patches)
            weights.append(sim if use_keys else torch.ones_like(sim))  # [B, N]
        similarities = cosine(vit.pooled(x), texts)  # [B, T]
    maps = []
    for grads in similarity_gradients(similarities, reads):
        per_layer = [
            ((g[:, 0:1].float() * val).sum(-1) * w).relu()  # [B, N]
            for g, val, w in zip(grads, values, weights, strict=True)
        ]
        maps.append(torch.stack(per_layer).sum(0))
    h, w = backend.grid_size(images)
    return torch.stack(maps, dim=1).view(images.shape[0], -1, h, w), stock


def text_importance(
    tower: TextTower, prompt: str, image_embeddings: Tensor, layers: int
) -> tuple[list[str], Tensor]:
    """Grad-ECLIP's text explanation of `prompt` (tokenised as given) for each image: the
    tokens between start and end of text, and their importance `[B, n]` (sums to 1).

    The last `layers` text blocks run one-headed with the causal mask; the target is
    `cos(image_embedding_b, text_embedding)`; per block `g` = its gradient at the pooled
    (end-of-text) row of `a`, `s_j = cos(q_eot, k_j)` min-maxed over all positions,
    importance `= ReLU(Σ_blocks Σ_c g_c · v_jc · s_j)`, kept between the start and end
    tokens and divided by its sum.
    """
    _check_layers(layers, tower.depth, "text_layers")
    tokens = tower.tokenize(prompt).to(image_embeddings.device)
    eot = tower.pooled_position(tokens)
    B = image_embeddings.shape[0]
    first = tower.depth - layers
    with torch.no_grad():
        x = tower.run_blocks(tower.embed(tokens), stop=first).expand(B, -1, -1)
    reads, terms = [], []
    with torch.enable_grad():
        for i in range(first, tower.depth):
            x, a, q, k, v = one_head_block(tower, i, x, tower.mask)
            reads.append(a)
            every = slice(0, None)
            terms.append((v.detach().float(), key_similarity(q.detach(), k.detach(), eot, every)))
        text = F.normalize(tower.pooled(x, eot).float(), dim=-1)  # [B, D], one copy per image
        target = (F.normalize(image_embeddings.float(), dim=-1) * text).sum()
    grads = torch.autograd.grad(target, reads)
    total = sum(
        (g[:, eot : eot + 1].float() * v).sum(-1) * s
        for g, (v, s) in zip(grads, terms, strict=True)
    )
    importance = total.relu()[:, 1:eot]  # type: ignore[union-attr]
    mass = importance.sum(dim=1, keepdim=True)
    return tower.words(tokens.cpu(), eot), importance / mass.clamp_min(1e-12)


def _text_side(
    backend: Backend, texts: Texts, image_embeddings: Tensor, layers: int
) -> tuple[Tensor, list[list[str]]] | None:
    """Token importance `[B, T, n_max]` (NaN past a prompt's tokens) and the tokens, or None
    when the text tower is not one clipviz reads token by token."""
    try:
        tower = backend.text_tower
    except ClipvizError:
        return None
    layers = min(layers, tower.depth)
    rows = [text_importance(tower, p, image_embeddings, layers) for p in texts.prompts]
    n = max(1, *(len(words) for words, _ in rows))
    out = torch.full((image_embeddings.shape[0], len(rows), n), float("nan"))
    for t, (words, weights) in enumerate(rows):
        out[:, t, : len(words)] = weights.detach().cpu()
    return out, [words + [""] * (n - len(words)) for words, _ in rows]


@register(
    "gradeclip",
    towers=("vit",),
    ranges={"layers": "[1, 256]", "text_layers": "[0, 256]"},
    needs={"vit": ("attention", "class_token")},
    summary="Grad-ECLIP: the cosine's gradient at the class token's attention output times the "
    "values, weighted by query-key similarity; also the importance of each prompt token",
    citation="Chenyang Zhao, Kun Wang, Xingyu Zeng, Rui Zhao, Antoni B. Chan: Gradient-based "
    "Visual Explanation for Transformer-based CLIP, ICML 2024",
    reference="Cyang-Zhao/Grad-Eclip, grad_eclip_image.ipynb (clip_encode_dense with n=1, "
    "sim_qk, grad_eclip) and grad_eclip_text.ipynb (clip_encode_text_dense with n=8)",
)
def gradeclip(
    backend: Backend,
    images: Tensor,
    texts: Texts,
    layers: int = 1,
    key_weights: bool = True,
    text_layers: int = 8,
) -> MapResult:
    """Grad-ECLIP: `map_j = Σ_blocks ReLU(Σ_c g_c · v_jc · s_j)` over the last `layers` blocks.

    layers: the last blocks explained (the reference: 1); each runs one-headed.
    key_weights: weight by `s_j = minmax_j cos(q_cls, k_j)` (the reference); False drops it.
    text_layers: the last text blocks of the text-side explanation (the reference: 8, or every
        block of a shallower text tower); 0: the image map only (about half the time).

    Per block, one-headed: `a = softmax(q kᵀ/√W) v` with q, k, v from `ln_1(x)` over the full
    width; `c = cos(image_embedding, text)` (no logit scale) of that forward; `g = ∂c/∂a` at
    the class token. The text side (`text_importance`) embeds each prompt exactly as given;
    it is stored when the text tower is an open_clip text transformer. The returned image
    embeddings are the stock ones (the one-headed forward's differ slightly).
    """
    check_grad_allowed("Grad-ECLIP")
    maps, stock = _image_maps(backend, images, texts, layers, key_weights)
    stock = F.normalize(stock.float(), dim=-1)
    if text_layers < 0:
        raise ClipvizError(f"gradeclip: text_layers={text_layers} must be 0 (none) or more")
    side = _text_side(backend, texts, stock, text_layers) if text_layers else None
    if side is None:
        return MapResult(maps.detach().float(), unit(stock))
    importance, words = side
    return MapResult(
        maps.detach().float(),
        unit(stock),
        extras={"text_importance": importance},
        labels={"text_tokens": words},
    )
