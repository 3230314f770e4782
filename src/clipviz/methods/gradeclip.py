"""Grad-ECLIP: the gradient of the image-text cosine at the attention output of the pooled
token, times the values, weighted by the query-key similarity of the pooled token.

As the authors' notebooks compute it, the explained blocks run their attention as one head
over the full width (scale `W^-½`), and that forward is the one whose cosine is explained.
The same formula explains the text side: the importance of each prompt token for the
image-text cosine, read at the end-of-text token of the last text blocks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..backend import Backend, Texts
from ..backend.text_tower import TextTower
from ..backend.towers import TOKENS
from ..errors import ClipvizError
from .gradients import check_grad_allowed, cosine, similarity_gradients, unit
from .kernels import embedding_rows, stock_block
from .registry import MapResult, register


def _full_width(t: Tensor) -> Tensor:
    """Per-head `[B, heads, L, d]` -> one head over the full width `[B, L, heads·d]`."""
    B, H, L, d = t.shape
    return t.transpose(1, 2).reshape(B, L, H * d)


def _per_head(t: Tensor, heads: int) -> Tensor:
    """Full width `[B, L, W]` -> per head `[B, heads, L, W / heads]`."""
    B, L, W = t.shape
    return t.view(B, L, heads, W // heads).transpose(1, 2)


def one_head_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    """Attention as one head over the full width `W`: `softmax(q kᵀ/√W + mask) v`."""
    logits = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    if mask is not None:
        logits = logits + mask.to(logits.dtype)
    return logits.softmax(dim=-1) @ v


def _block_after_attention(tower: Any, i: int, x: Tensor, a: Tensor, heads: int) -> Tensor:
    """The rest of block `i` once its full-width attention output `a` is known:
    `y = x + out_proj(a)`, `y + mlp(ln_2(y))`. `a` is read for its gradient: where nothing
    before it carries a graph (the first explained block), the graph starts at it."""
    if not a.requires_grad:
        a.requires_grad_(True)
    y = x + tower.attn_out(i, _per_head(a, heads))
    return y + tower.mlp(i, y)


def one_head_block(
    tower: Any,
    i: int,
    x: Tensor,
    mask: Tensor | None = None,
    qkv: tuple[Tensor, Tensor, Tensor] | None = None,
    rows: slice = slice(None),
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Block `i` of `tower` (any adapter giving `norm1`, `qkv`, `attn_out`, `mlp` by index)
    with its attention as one head over the full width, as the reference runs it:
    `a = softmax(q kᵀ/√W + mask) v`, `y = x + out_proj(a)`, `y + mlp(ln_2(y))`.

    qkv: the block's per-head q, k, v of `x` when the caller holds them.
    rows: the rows whose output is computed (as queries; every row is a key).

    Returns `y` and the full-width `a` (`[B, rows, W]`, requires grad), `q`, `k`, `v`
    (`[B, L, W]`).
    """
    q, k, v = tower.qkv(i, tower.norm1(i, x)) if qkv is None else qkv
    heads = q.shape[1]
    q, k, v = _full_width(q), _full_width(k), _full_width(v)
    a = one_head_attention(q[:, rows], k, v, None if mask is None else mask[rows])
    return _block_after_attention(tower, i, x[:, rows], a, heads), a, q, k, v


def one_head_row(
    tower: Any, i: int, x: Tensor, keys: Tensor, values: Tensor, at: Tensor, mask: Tensor
) -> tuple[Tensor, Tensor]:
    """`one_head_block` at one row of each entry: `x` `[E, 1, W]` is the stream at that row;
    `keys`, `values` `[E, L, W]` the block's at every position, the row's own (where `at`
    `[E, L, 1]` holds) replaced by those computed here from `x`; `mask` `[E, 1, L]` the
    row's line of the additive mask. Returns the row's output and its `a` `[E, 1, W]`."""
    q, k, v = tower.qkv(i, tower.norm1(i, x))
    heads = q.shape[1]
    q, k, v = _full_width(q), _full_width(k), _full_width(v)
    a = one_head_attention(q, torch.where(at, k, keys), torch.where(at, v, values), mask)
    return _block_after_attention(tower, i, x, a, heads), a


def key_similarity(query: Tensor, keys: Tensor) -> Tensor:
    """`cos(query, k_j)` of one query `[B, W]` with keys `[B, J, W]`, min-max normalised over
    the keys: `[B, J]`."""
    s = (F.normalize(query, dim=-1)[:, None] * F.normalize(keys, dim=-1)).sum(-1)
    lo, hi = s.min(dim=1, keepdim=True).values, s.max(dim=1, keepdim=True).values
    return (s - lo) / (hi - lo)


def _check_layers(layers: int, depth: int, what: str) -> None:
    if not 1 <= layers <= depth:
        raise ClipvizError(f"gradeclip: {what}={layers} is outside 1…{depth}, the tower's blocks")


def _image_maps(
    backend: Backend, images: Tensor, texts: Texts, layers: int, use_keys: bool
) -> tuple[Tensor, Tensor]:
    """Maps `[B, T, h, w]` and the stock image embeddings `[B, D]` (the stock blocks run
    from the input the explained ones share, with the first explained block's q, k, v).

    The last block, stock and explained, is computed at the rows the embedding reads
    (`embedding_rows`: the class token alone where it is `post_norm(class token) @ proj`).
    """
    vit = backend.vit
    _check_layers(layers, vit.depth, "layers")
    first, last = vit.depth - layers, vit.depth - 1
    patches = slice(vit.prefix, None)
    with torch.no_grad(), backend.autocast():
        x = vit.run_blocks(vit.embed(images), stop=first)
        qkv = vit.qkv(first, vit.norm1(first, x))
        rows = embedding_rows(vit) if first == last else slice(None)
        stock = vit.pooled(vit.run_blocks(stock_block(vit, first, x, qkv, rows), start=first + 1))
    reads, weights, values = [], [], []
    with torch.enable_grad(), backend.autocast():
        for i in range(first, vit.depth):
            rows = embedding_rows(vit) if i == last else slice(None)
            x, a, q, k, v = one_head_block(vit, i, x, qkv=qkv if i == first else None, rows=rows)
            reads.append(a)
            values.append(v[:, patches].detach().float())  # [B, N, W]
            sim = key_similarity(q[:, 0].detach().float(), k[:, patches].detach().float())
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
    tower: TextTower, prompts: Sequence[str], image_embeddings: Tensor, layers: int
) -> list[tuple[list[str], Tensor]]:
    """Grad-ECLIP's text explanation of each prompt (tokenised as given) for each image: per
    prompt, the tokens between start and end of text and their importance `[B, n]` (sums
    to 1).

    The last `layers` text blocks run one-headed with the tower's mask; the target is
    `cos(image_embedding_b, text_embedding)`; per block `g` = its gradient at the pooled
    (end-of-text) row of `a`, `s_j = cos(q_eot, k_j)` min-maxed over all positions,
    importance `= ReLU(Σ_blocks Σ_c g_c · v_jc · s_j)`, kept between the start and end
    tokens and divided by its sum.

    The blocks run once per prompt; the gradients come from one backward in which each
    (prompt, image) pair is an entry. Under a causal mask no earlier row depends on the
    pooled one, so a pair's graph is the pooled row alone, through the explained blocks, with
    the other rows' keys and values from that run; without one, every row of every pair.
    """
    _check_layers(layers, tower.depth, "text_layers")
    device = image_embeddings.device
    tokens = torch.cat([tower.tokenize(p) for p in prompts]).to(device)  # [T, L]
    ends = [tower.pooled_position(tokens[t : t + 1]) for t in range(len(prompts))]
    B, T, L = image_embeddings.shape[0], len(prompts), tokens.shape[1]
    each = torch.arange(T, device=device)  # per prompt
    ends_t = torch.tensor(ends, device=device)
    prompt, end = each.repeat_interleave(B), ends_t.repeat_interleave(B)  # per pair t·B + b
    entries = torch.arange(T * B, device=device)
    first, mask, causal = tower.depth - layers, tower.mask, tower.causal
    with torch.no_grad():
        x = tower.run_blocks(tower.embed(tokens), stop=first)  # [T, L, W]
        runs = []  # per explained block: its input, keys, values and `s_j` `[T, L]`
        for i in range(first, tower.depth):
            x_next, _, q, k, v = one_head_block(tower, i, x, mask)
            runs.append((x, k, v, key_similarity(q[each, ends_t], k)))
            x = x_next
    reads = []
    with torch.enable_grad():
        if mask is not None and causal:
            x = runs[0][0][prompt, end, None]  # the pooled row of each pair `[T·B, 1, W]`
            at = (torch.arange(L, device=device) == end[:, None])[..., None]
            for (_, k, v, _), i in zip(runs, range(first, tower.depth), strict=True):
                x, a = one_head_row(tower, i, x, k[prompt], v[prompt], at, mask[end, None])
                reads.append(a)
            text = tower.pooled(x, 0)
        else:
            x = runs[0][0][prompt]  # every row of each pair `[T·B, L, W]`
            for i in range(first, tower.depth):
                x, a, *_ = one_head_block(tower, i, x, mask)
                reads.append(a)
            text = tower.pooled(x[entries, end, None], 0)
        image = F.normalize(image_embeddings.float(), dim=-1).repeat(T, 1)  # pair t·B+b: b
        target = (image * F.normalize(text.float(), dim=-1)).sum()
    grads = torch.autograd.grad(target, reads)
    total = torch.stack(
        [
            (v[prompt].float() @ g[entries, 0 if causal else end].float()[..., None])[..., 0]
            * s[prompt]
            for g, (_, _, v, s) in zip(grads, runs, strict=True)
        ]
    ).sum(0)  # Σ_blocks Σ_c g_c · v_jc · s_j `[T·B, L]`
    out = []
    for t, stop in enumerate(ends):
        importance = total.relu()[t * B : (t + 1) * B, 1:stop]
        mass = importance.sum(dim=1, keepdim=True)
        out.append((tower.words(tokens[t : t + 1].cpu(), stop), importance / mass.clamp_min(1e-12)))
    return out


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
    rows = text_importance(tower, texts.prompts, image_embeddings, layers)
    n = max(1, *(len(words) for words, _ in rows))
    out = torch.full((image_embeddings.shape[0], len(rows), n), float("nan"))
    for t, (words, weights) in enumerate(rows):
        out[:, t, : len(words)] = weights.detach().cpu()
    return out, [words + [""] * (n - len(words)) for words, _ in rows]


@register(
    "gradeclip",
    towers=(TOKENS,),
    ranges={"layers": "[1, 256]", "text_layers": "[0, 256]"},
    needs={TOKENS: ("attention", "class_token")},
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
        block of a shallower text tower); 0: the image map only.

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
