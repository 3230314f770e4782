"""SC-CLIP: self-calibrated CLIP for training-free open-vocabulary segmentation.

Three repairs around the last block. Anomalous patch tokens (the few with a high local
outlier factor after the second-to-last block) are replaced by the mean of their neighbours.
The last block's attention becomes the mean of a softmax over the patch-to-patch cosine of
an intermediate block and the k-k attention, without residual or MLP, plus a share of the
class token. Its output, and the same last-block attention applied to the sum of several
intermediate blocks, are averaged over the patches that an intermediate block finds similar.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..backend import Backend, Texts, TokenTower
from ..backend.towers import TOKENS
from ..errors import ClipvizError
from .kernels import QKV
from .registry import MapResult, register
from .surgery import _itsm, _unit, stock_block

# the authors' layer indices for ViT-B/16 (12 blocks) and ViT-L/14 (24 blocks, SC-CLIP#5):
# (pre_adjust, post_adjust, multi_start, multi_end, res_cls)
AUTHOR_SETTINGS = {12: (8, 3, 3, 10, 0.3), 24: (16, 6, 8, 19, 0.1)}


Blocks = tuple[int, int, int, int]  # pre_adjust, post_adjust, multi_start, multi_end


def scaled_blocks(blocks: Blocks | tuple[float, ...], depth: int) -> Blocks:
    """ViT-B/16's block indices scaled to a tower of `depth` blocks (each within the blocks
    before the last; multi_end at least 1 and at most the last)."""
    last = depth - 1
    return (
        *(min(round(int(i) * depth / 12), last - 1) for i in blocks[:3]),
        min(max(round(int(blocks[3]) * depth / 12), 1), last),
    )  # type: ignore[return-value]


def chosen_blocks(
    method: str, backend: Backend, defaults: Blocks | tuple[float, ...],
    given: tuple[int | None, int | None, int | None, int | None],
) -> Blocks:  # fmt: skip
    """The block indices given, `defaults` for those left None, checked against the tower:
    pre_adjust and post_adjust before the last block, 0 ≤ multi_start < multi_end ≤ last."""
    last = backend.vit.depth - 1
    pre_adjust, post_adjust, multi_start, multi_end = (
        int(d) if g is None else g for g, d in zip(given, defaults, strict=True)
    )
    for name, value in (("pre_adjust", pre_adjust), ("post_adjust", post_adjust)):
        if not 0 <= value < last:
            raise ClipvizError(
                f"{method}: {name}={value} is outside 0…{last - 1}, the blocks before the last "
                f"of {backend.identity['model']}"
            )
    if not 0 <= multi_start < multi_end <= last:
        raise ClipvizError(
            f"{method}: multi_start={multi_start}, multi_end={multi_end} must satisfy "
            f"0 ≤ multi_start < multi_end ≤ {last} for {backend.identity['model']}"
        )
    return pre_adjust, post_adjust, multi_start, multi_end


def local_outlier_factor(x: torch.Tensor, neighbours: int) -> torch.Tensor:
    """Local outlier factor per token `[B, N]` of tokens `x` `[B, N, W]`, as the authors
    compute it: squared Euclidean distances; the reach distance of `p` to a neighbour `o` is
    `max(d(p, o), k-distance of p)`; `lrd = k / mean reach`; LOF = mean of `lrd(o) / lrd(p)`
    over the `k` nearest neighbours (self left out)."""
    d = torch.cdist(x, x) ** 2  # [B, N, N]
    near, index = d.topk(neighbours + 1, dim=-1, largest=False)
    near, index = near[..., 1:], index[..., 1:]
    reach = torch.maximum(near, near[..., -1:])
    lrd = neighbours / torch.nan_to_num(reach.mean(dim=-1), nan=1e-6)  # [B, N]
    neighbour_lrd = torch.gather(lrd, 1, index.flatten(1)).view_as(index)
    return (neighbour_lrd / lrd[..., None]).mean(dim=-1)


def anomalous_tokens(x: torch.Tensor, neighbours: int, contamination: float) -> torch.Tensor:
    """Mask `[B, N]` of the tokens whose LOF exceeds its `1 − contamination` quantile."""
    lof = local_outlier_factor(x.float(), neighbours)
    return lof > torch.quantile(lof, 1 - contamination, dim=-1, keepdim=True)


def fill_from_neighbours(
    x: torch.Tensor, anomalous: torch.Tensor, grid: tuple[int, int]
) -> torch.Tensor:
    """Patch tokens `x` `[B, N, W]` with each anomalous one replaced by the mean of its
    non-anomalous 8-neighbours on the grid (kept as it is when it has none)."""
    B, N, W = x.shape
    keep = (~anomalous).to(x.dtype).view(B, 1, *grid)
    fmap = x.transpose(1, 2).reshape(B, W, *grid)
    ring = torch.ones(1, 1, 3, 3, dtype=x.dtype, device=x.device)
    ring[..., 1, 1] = 0
    sums = F.conv2d(fmap * keep, ring.expand(W, 1, 3, 3), padding=1, groups=W)
    counts = F.conv2d(keep, ring, padding=1)
    update = anomalous.view(B, 1, *grid) & (counts > 0)
    filled = torch.where(update, sums / counts.clamp(min=1), fmap)
    return filled.reshape(B, W, N).transpose(1, 2)


def patch_affinity(x: torch.Tensor) -> torch.Tensor:
    """Cosine between the patch tokens `x` `[B, N, W]`: `[B, N, N]`."""
    x = F.normalize(x.float(), dim=-1)
    return x @ x.transpose(1, 2)


def aggregate(x: torch.Tensor, affinity: torch.Tensor, beta: float) -> torch.Tensor:
    """Each token replaced by the mean of the tokens whose affinity with it is at least
    `beta`, weighted by that affinity (rows renormalised, `+1e-6`)."""
    a = torch.where(affinity < beta, torch.zeros_like(affinity), affinity)
    a = a / (a.sum(dim=-1, keepdim=True) + 1e-6)
    return (a @ x.float()).to(x.dtype)


def affinity_attention(affinity: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """`softmax(m) v` for every head, `m = 3 (a − mean a)` and `−∞` where negative (a: the
    patch affinity `[B, N, N]`, its mean per image). The diagonal (a token's cosine with
    itself, 1, never below the mean) is kept where rounding puts it under a mean of nearly
    identical tokens, which would leave a row of `−∞` only."""
    m = 3 * (affinity - affinity.mean(dim=(1, 2), keepdim=True))
    self_pairs = torch.eye(m.shape[-1], dtype=torch.bool, device=m.device)
    m = m.masked_fill((m < 0) & ~self_pairs, float("-inf"))
    return m.softmax(dim=-1)[:, None].to(v.dtype) @ v


def calibrated_attention(affinity: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """SC-CLIP's last-block attention per head: `½ (softmax(m) + softmax(k kᵀ/√d)) v`, m as
    in `affinity_attention`."""
    return (affinity_attention(affinity, v) + F.scaled_dot_product_attention(k, k, v)) / 2


def fused_last_block(
    vit: TokenTower,
    x: torch.Tensor,
    outputs: list[torch.Tensor],
    patches: torch.Tensor,
    before: torch.Tensor,
    after: torch.Tensor,
    multi: tuple[int, int],
    beta: float,
    res_cls: float,
    attention: Callable[[QKV, bool], torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """SC-CLIP's and SFP's readout: unit patch tokens `[B, N, D]` and the stock global
    embeddings `[B, D]` of the stream `x` before the last block.

    The last block is `attn_out(attention((q, k, v), True))` plus `res_cls ·` the class token,
    no residual, no MLP, on `patches` aggregated by the affinity `before`; its output is
    aggregated by the affinity `after`. The sum of `outputs[multi[0]:multi[1]]` goes the same
    way with `attention(…, False)` and its own class token, and is added.
    """
    prefix, last = vit.prefix, vit.depth - 1

    def last_block(stream: torch.Tensor, patches: torch.Tensor, own: bool) -> torch.Tensor:
        # q, k and v of the patches alone; the prefix tokens go along so that towers with
        # rotary positions place every patch where it is
        h = vit.norm1(last, torch.cat([stream[:, :prefix], patches], dim=1))
        q, k, v = (t[:, :, prefix:] for t in vit.qkv(last, h))
        return vit.attn_out(last, attention((q, k, v), own)) + res_cls * stream[:, :1]

    out = aggregate(last_block(x, aggregate(patches, before, beta), True), after, beta)
    summed = torch.stack(outputs[multi[0] : multi[1]]).sum(dim=0)
    out = out + aggregate(last_block(summed, summed[:, prefix:], False), after, beta)
    # the stock head reads the patches after the prefix tokens
    tokens = _unit(vit.head(torch.cat([x[:, :prefix], out], dim=1)))[:, 1:]
    stock = _unit(vit.pooled(stock_block(vit, last, x, vit.qkv(last, vit.norm1(last, x)))))
    return tokens, stock


@register(
    "scclip",
    towers=(TOKENS,),
    ranges={
        "pre_adjust": "[0, 255]",
        "post_adjust": "[0, 255]",
        "multi_start": "[0, 255]",
        "multi_end": "[1, 256]",
        "res_cls": "[0, 10]",
        "beta": "[-1, 1]",
        "neighbours": "[1, 1000]",
        "contamination": "(0, 0.5]",
    },
    needs={TOKENS: ("attention", "class_token")},
    summary="SC-CLIP: anomalous tokens filled from neighbours, last block as affinity plus k-k "
    "attention, multi-level features, affinity aggregation, cosine",
    citation="Sule Bai, Yong Liu, Yifei Han, Haoji Zhang, Yansong Tang: Self-Calibrated CLIP "
    "for Training-Free Open-Vocabulary Segmentation, arXiv:2411.15869, 2024",
    reference="SuleBai/SC-CLIP, clip/model.py (VisionTransformer.forward, custom_attn, "
    "lof_pytorch, mean_interpolation, adaptively_aggregate)",
    defaults="ViT-B/16: pre_adjust 8, post_adjust 3, multi-level blocks 3-9, res_cls 0.3; "
    "ViT-L/14: 16, 6, 8-18, 0.1; other depths: the ViT-B/16 indices scaled; beta 0.4, LOF "
    "with 30 neighbours (at most the patches less one) and contamination 0.05; per image "
    "(the reference handles one)",
)
def scclip(
    backend: Backend,
    images: torch.Tensor,
    texts: Texts,
    pre_adjust: int | None = None,
    post_adjust: int | None = None,
    multi_start: int | None = None,
    multi_end: int | None = None,
    res_cls: float | None = None,
    beta: float = 0.4,
    neighbours: int = 30,
    contamination: float = 0.05,
) -> MapResult:
    """SC-CLIP: self-calibrated last block with multi-level fusion, then ITSM.

    pre_adjust: the block whose (filled) patch affinity aggregates the last block's input and
        forms its attention (0-based block index, below the last block).
    post_adjust: the block whose patch affinity aggregates the last block's outputs.
    multi_start: the first block of the multi-level sum.
    multi_end: the block after the last of the multi-level sum.
    res_cls: the share of the class token added to every patch after the last block.
    beta: affinities below it are left out of the aggregations.
    neighbours: neighbours of the local outlier factor.
    contamination: the share of tokens taken as anomalous.

    With `x` the stream after all blocks but the last: its patches with anomalous tokens
    filled, aggregated by the pre_adjust affinity, go through the last block's
    `attn_out(calibrated_attention)` (q, k, v from `ln_1`, no residual, no MLP) plus
    `res_cls ·` its class token, then are aggregated by the post_adjust affinity; the sum of
    the block outputs multi_start … multi_end−1 goes the same way (its own class token) and
    is added. `ln_post`, `proj`, normalise, cosine with the texts. Global embeddings: stock.
    """
    vit = backend.readout_vit
    last = vit.depth - 1
    if last < 1:
        raise ClipvizError(f"scclip: {backend.identity['model']} has one block; it needs two")
    authors = (
        AUTHOR_SETTINGS.get(vit.depth)
        or (  # else the ViT-B/16 indices, scaled
            *scaled_blocks(AUTHOR_SETTINGS[12][:4], vit.depth),
            0.3,
        )
    )
    pre_adjust, post_adjust, multi_start, multi_end = chosen_blocks(
        "scclip", backend, authors[:4], (pre_adjust, post_adjust, multi_start, multi_end)
    )
    res_cls = authors[4] if res_cls is None else res_cls
    grid = backend.grid_size(images)
    prefix = vit.prefix
    n = grid[0] * grid[1]
    neighbours = min(neighbours, n - 1)
    if neighbours < 1:
        raise ClipvizError("scclip: the image has one patch; it needs at least two")
    with torch.no_grad(), backend.autocast():
        outputs = []  # block outputs 0 … last-1
        x = vit.embed(images)
        for i in range(last):
            x = vit.run_block(i, x)
            outputs.append(x)
        anomalous = anomalous_tokens(x[:, prefix:], neighbours, contamination)
        patches = fill_from_neighbours(x[:, prefix:], anomalous, grid)
        before = patch_affinity(
            fill_from_neighbours(outputs[pre_adjust][:, prefix:], anomalous, grid)
        )
        after = patch_affinity(outputs[post_adjust][:, prefix:])
        tokens, stock = fused_last_block(
            vit, x, outputs, patches, before, after, (multi_start, multi_end), beta, res_cls,
            lambda qkv, own: calibrated_attention(before, qkv[1], qkv[2]),
        )  # fmt: skip
    return _itsm(backend, images, texts, tokens, stock)
