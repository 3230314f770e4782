"""The dense pieces the training-free methods share: similarities of tokens with texts as maps,
a ViT block run stock from q, k, v already computed, the last block replaced by a variant,
and the parallel path of CLIP Surgery and GEM.

None of them modifies the model: each runs the blocks' own pieces (`ln_1`, q/k/v,
`out_proj`, the MLP branch), which the backend's tower adapter gives.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..backend import Backend, Texts, TokenTower
from ..errors import ClipvizError
from .registry import MapResult

# a block's (q, k, v), each `[B, heads, L, head_dim]`
QKV = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def normalized(x: torch.Tensor) -> torch.Tensor:
    """`x` in float32, unit length along its last axis."""
    return F.normalize(x.float(), dim=-1)


def patch_maps(similarity: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Similarities of the patches with the texts `[B, N, T]` as maps `[B, T, h, w]`
    (float32)."""
    B, _, T = similarity.shape
    return similarity.transpose(1, 2).reshape(B, T, *grid).float()


def similarity_maps(
    tokens: torch.Tensor, text: torch.Tensor, grid: tuple[int, int]
) -> torch.Tensor:
    """`tokens @ text.T` as maps `[B, T, h, w]` (tokens: the patches `[B, N, D]`, text
    `[T, D]`; cosines when both are unit length)."""
    return patch_maps(tokens @ text.T, grid)


def cosine_maps(
    backend: Backend, images: torch.Tensor, texts: Texts, tokens: torch.Tensor, stock: torch.Tensor
) -> MapResult:
    """The cosine of unit patch tokens `[B, N, D]` with the texts, in float32 (outside
    autocast), with the stock global embeddings `[B, D]`."""
    maps = similarity_maps(tokens, texts.embeddings.float(), backend.grid_size(images))
    return MapResult(maps, image_embeddings=stock)


def stock_block(
    vit: TokenTower, i: int, x: torch.Tensor, qkv: QKV, rows: slice = slice(None)
) -> torch.Tensor:
    """Block `i`'s stock output on the stream `x`, from the q, k, v of `norm1(x)` a method
    already holds (so its own path and the stock one compute them once).

    rows: the tokens whose output is computed, as queries (every token stays a key; blocks
        without an attention bias).
    """
    q, k, v = qkv
    y = x[:, rows] + vit.attn_out(i, vit.attend(i, q[:, :, rows], k, v))
    return y + vit.mlp(i, y)


def embedding_rows(vit: TokenTower) -> slice:
    """The tokens of the last block's output that the image embedding reads: the class token
    alone where it is `post_norm(class token) @ proj` (and the block has no attention bias),
    else all."""
    last = vit.depth - 1
    if "linear_head" in vit.capabilities and vit.attention_bias(last) is None:
        return slice(0, 1)
    return slice(None)


def last_block_variant(
    vit: TokenTower,
    images: torch.Tensor,
    tokens_of: Callable[[int, torch.Tensor, QKV], torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit patch tokens `[B, N, D]` from `tokens_of(last, x, (q, k, v))` in place of the
    last block, and the stock global embeddings `[B, D]`; the variant and the stock block
    share the last block's q, k, v (computed once)."""
    last = vit.depth - 1
    x = vit.run_blocks(vit.embed(images), stop=last)
    qkv = vit.qkv(last, vit.norm1(last, x))
    tokens = normalized(vit.head(tokens_of(last, x, qkv)))[:, 1:]
    stock = normalized(vit.pooled(stock_block(vit, last, x, qkv)))
    return tokens, stock


def first_path_block(backend: Backend, depth: int | None, default: int, method: str) -> int:
    """The index of the first of the last `depth` blocks (None: the last `default`, or every
    block of a shallower tower); a depth the tower lacks is a usage error."""
    blocks = backend.vit.depth
    if depth is None:
        depth = min(default, blocks)
    if not 1 <= depth <= blocks:
        raise ClipvizError(
            f"{method}: depth={depth} is outside 1…{blocks}, the blocks of "
            f"{backend.identity['model']}"
        )
    return blocks - depth


def parallel_path(
    vit: TokenTower,
    images: torch.Tensor,
    first: int,
    mix: Callable[[int, torch.Tensor, QKV], torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP Surgery's and GEM's second stream: unit patch tokens `[B, N, D]` and the stock
    global embeddings `[B, D]`.

    The stock stream `x` runs every block. From block `first` on, the path starts equal to it
    and, per block `i`, adds `attn_out(mix(i, h, (q, k, v)))`, with `h = ln_1(x)` of the
    stock stream and its q, k, v (computed once for both streams), and no MLP. Patch tokens
    come from the path through the head, the global embeddings from the stock stream.
    """
    x = vit.run_blocks(vit.embed(images), stop=first)
    path = x
    for i in range(first, vit.depth):
        h = vit.norm1(i, x)
        qkv = vit.qkv(i, h)
        path = path + vit.attn_out(i, mix(i, h, qkv))
        # the last stock block: only what the embedding reads (the path needs its q, k, v)
        x = stock_block(vit, i, x, qkv, embedding_rows(vit) if i == vit.depth - 1 else slice(None))
    return normalized(vit.head(path))[:, 1:], normalized(vit.pooled(x))
