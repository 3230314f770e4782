"""ResCLIP: residual attention for training-free open-vocabulary segmentation, on NACLIP's
reduced last block (k-k attention with a Gaussian neighbourhood prior, no residual, no MLP).

Residual Cross-correlation Self-attention (RCS) mixes the mean attention of intermediate
blocks into the last block's. Semantic Feedback Refinement (SFR) segments the image once
with that block, takes each patch's most frequent label, and adds to the attention logits a
map of which patches share a label (decayed with distance where the straight path between
them leaves the label, blurred along each row).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..backend import Backend, Texts
from ..backend.towers import TOKENS
from ..errors import ClipvizError
from .registry import MapResult, register
from .selfattention import neighbourhood_bias
from .surgery import _itsm, _unit, stock_block

RCS_BLOCKS = (5, 9)  # the reference's blocks 6-9 (0-based 5…8), for every model size
SFR_PAMR = (10, (8, 16))  # the PAMR of the preliminary segmentation: steps, dilations


def patch_labels(
    images: torch.Tensor, cosines: torch.Tensor, logit_scale: float, threshold: float, patch: int
) -> torch.Tensor:
    """SFR's preliminary labels per patch `[B, h, w]` from patch cosines `[B, T, h, w]`:
    upsampled to the input, refined by PAMR on it, `softmax(logit_scale · cos)` over the
    texts, per pixel the argmax (text 0 where its probability is under `threshold`), per
    patch the most frequent pixel label (the smallest of ties)."""
    from ..segment.pamr import pamr  # the protocol's PAMR: segment imports the methods

    B, T, h, w = cosines.shape
    up = F.interpolate(cosines, size=images.shape[-2:], mode="bilinear", align_corners=False)
    probs = (logit_scale * pamr(images.float(), up, *SFR_PAMR)).softmax(dim=1)
    top, labels = probs.max(dim=1)  # [B, H, W]
    labels = torch.where(top < threshold, torch.zeros_like(labels), labels)
    cells = labels[:, : h * patch, : w * patch].reshape(B, h, patch, w, patch)
    counts = F.one_hot(cells.permute(0, 1, 3, 2, 4).flatten(3), T).sum(dim=3)  # [B, h, w, T]
    return counts.argmax(dim=-1)


def straight_paths(grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """For every pair of patches `(i, j)`: the patches `[N, N, S]` sampled on the straight
    line from i towards j and whether each sample counts `[N, N, S]`, as the reference's
    `check_path`: S = 1 + the longest Chebyshev distance on the grid, sample s at
    `round(i + (j − i) · s / (S − 1))` (float32, halves to even), counting while s is at most
    the pair's own Chebyshev distance."""
    h, w = grid
    index = torch.arange(h * w)
    coords = torch.stack([index // w, index % w], dim=-1)  # [N, 2]
    start = coords[:, None].expand(-1, h * w, -1).reshape(-1, 2)
    end = coords[None].expand(h * w, -1, -1).reshape(-1, 2)
    steps = (end - start).abs().max(dim=1).values  # [N²]
    longest = max(int(steps.max()), 1)
    t = torch.linspace(0, 1, steps=longest + 1)[None, :, None]
    points = (start[:, None] * (1 - t) + end[:, None] * t).round().long()  # [N², S, 2]
    samples = (points[..., 0] * w + points[..., 1]).view(h * w, h * w, -1)
    counted = (torch.arange(longest + 1)[None] <= steps[:, None]).view(h * w, h * w, -1)
    return samples, counted


def feedback_attention(
    labels: torch.Tensor, std: float, keep_entity: bool, prefix: int
) -> torch.Tensor:
    """SFR's attention `[B, prefix + N, prefix + N]` from patch labels `[B, h, w]`: 1 where two
    patches share a label; with keep_entity, pairs whose straight path leaves the label are
    scaled by `exp(−distance / longest distance)`; each row blurred by a 1-D Gaussian of
    `std` (over the flattened patch index, zero padded), ReLU, rows renormalised, the prefix
    rows and columns 0, then divided by the maximum."""
    B, h, w = labels.shape
    n = h * w
    flat = labels.flatten(1)  # [B, N]
    same = (flat[:, :, None] == flat[:, None, :]).float()
    if keep_entity:
        samples, counted = straight_paths((h, w))
        samples, counted = samples.to(labels.device), counted.to(labels.device)
        along = flat[:, samples.flatten()].view(B, n, n, -1)  # labels along each path
        valid = ((along == flat[:, :, None, None]) | ~counted).all(dim=-1)
        distance = counted.sum(dim=-1) - 1
        decay = torch.exp(-distance / max(int(distance.max()), 1))
        same = torch.where(valid, same, same * decay)
    size = min(n, int(6 * std + 1))
    size += 1 - size % 2
    x = torch.arange(size, device=labels.device) - size // 2
    kernel = torch.exp(-(x**2) / (2 * std**2))
    blurred = F.conv1d(
        same.view(-1, 1, n), (kernel / kernel.sum()).view(1, 1, -1), padding=size // 2
    )
    blurred = blurred.view(B, n, n).relu()
    attention = F.pad(blurred / (blurred.sum(dim=-1, keepdim=True) + 1e-8), (prefix, 0, prefix, 0))
    return attention / attention.amax(dim=(1, 2), keepdim=True)


@register(
    "resclip",
    towers=(TOKENS,),
    ranges={
        "rcs_start": "[0, 255]",
        "rcs_end": "[1, 256]",
        "std": "[0.1, 1000]",
        "temp_thd": "[0, 1]",
        "rcs_tau": "[0, 100]",
        "rcs_lambda": "[0, 1]",
        "sfr_tau": "[0, 100]",
        "sfr_lambda": "[0, 1]",
        "logit_scale": "(0, 1000]",
    },
    needs={TOKENS: ("attention", "class_token")},
    summary="ResCLIP: NACLIP's last block with the mean attention of intermediate blocks (RCS) "
    "and a same-label attention from a first segmentation (SFR), cosine",
    citation="Yuhang Yang, Jinhong Deng, Wen Li, Lixin Duan: ResCLIP: Residual Attention for "
    "Training-free Dense Vision-language Inference, CVPR 2025",
    reference="yvhangyang/ResCLIP, clip/model.py (VisionTransformer.forward, custom_attn with "
    "arch 'wo_resi' and attn_strategy 'resclip', create_logit_temp, create_patch_matrix, "
    "generate_attention_sfr, check_path)",
    defaults="RCS: blocks 6-9 (other depths: scaled), tau 2.0, lambda 0.4; SFR: PAMR 10 steps "
    "(8, 16), temp_thd 0.11, tau 1.8, lambda 0.7, same-entity decay; Gaussian std 5, logit "
    "scale 40 — the authors' COCO-Stuff and COCO-Object values (they tune temp_thd and the "
    "weights per benchmark); per image (the reference handles one)",
)
def resclip(
    backend: Backend,
    images: torch.Tensor,
    texts: Texts,
    rcs: bool = True,
    sfr: bool = True,
    rcs_start: int | None = None,
    rcs_end: int | None = None,
    std: float = 5.0,
    temp_thd: float = 0.11,
    rcs_tau: float = 2.0,
    rcs_lambda: float = 0.4,
    sfr_tau: float = 1.8,
    sfr_lambda: float = 0.7,
    keep_entity: bool = True,
    logit_scale: float = 40.0,
) -> MapResult:
    """ResCLIP: RCS and SFR on NACLIP's reduced last block, then ITSM.

    rcs: mix the intermediate blocks' attention into the last block's (RCS).
    sfr: add the same-label attention of a first segmentation (SFR).
    rcs_start: the first block whose attention RCS averages; None: the reference's 6th (5).
    rcs_end: the block after the last one RCS averages; None: the reference's 9.
    std: NACLIP's Gaussian prior and SFR's row blur, in patches.
    temp_thd: SFR: pixels whose top probability is below it take text 0's label.
    rcs_tau: RCS's scale of the mixed attention.
    rcs_lambda: RCS's share of the intermediate attention.
    sfr_tau: SFR's scale of the mixed logits.
    sfr_lambda: SFR's share of the same-label attention.
    keep_entity: SFR: decay same-label pairs that the straight path between them leaves.
    logit_scale: SFR: the logit scale of its first segmentation.

    Last block: `A = softmax(τ_s ((1 − λ_s) k kᵀ/√d + λ_s S) + ω)` (S: `feedback_attention`,
    ω: NACLIP's prior), then `τ_r ((1 − λ_r) A + λ_r R)` (R: the mean attention of blocks
    rcs_start … rcs_end−1), `attn_out(A v)`, no residual, no MLP; `ln_post`, `proj`,
    normalise, cosine with the texts. S comes from the same block without it, its cosine
    maps through `patch_labels`. Global embeddings: stock.
    """
    vit = backend.vit
    last = vit.depth - 1
    if last < 1:
        raise ClipvizError(f"resclip: {backend.identity['model']} has one block; it needs two")
    # a tower too shallow for the reference's blocks: the same blocks, scaled to its depth
    scaled = RCS_BLOCKS[1] > last
    if rcs_start is None:
        rcs_start = min(round(5 * vit.depth / 12), last - 1) if scaled else RCS_BLOCKS[0]
    if rcs_end is None:
        rcs_end = min(max(round(9 * vit.depth / 12), 1), last) if scaled else RCS_BLOCKS[1]
    if rcs and not 0 <= rcs_start < rcs_end <= last:
        raise ClipvizError(
            f"resclip: rcs_start={rcs_start}, rcs_end={rcs_end} must satisfy "
            f"0 ≤ rcs_start < rcs_end ≤ {last} for {backend.identity['model']}"
        )
    grid = backend.grid_size(images)
    prefix = vit.prefix
    omega = backend.memo(
        ("naclip-bias", grid, prefix, std),
        lambda: neighbourhood_bias(grid, prefix, std).to(images.device),
    )
    with torch.no_grad(), backend.autocast():
        x = vit.embed(images)
        attentions = []
        for i in range(last):
            if rcs and rcs_start <= i < rcs_end:
                x, probs = vit.block_with_attention(i, x)
                attentions.append(probs)
            else:
                x = vit.run_block(i, x)
        q, k, v = vit.qkv(last, vit.norm1(last, x))
        kk = (k * k.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # [B, heads, L, L]
        intermediate = torch.stack(attentions).mean(dim=0) if rcs else None

        def reduced_block(logits: torch.Tensor) -> torch.Tensor:
            attention = (logits + omega.to(logits.dtype)).softmax(dim=-1)
            if intermediate is not None:
                mixed = (1 - rcs_lambda) * attention + rcs_lambda * intermediate
                attention = rcs_tau * mixed
            return vit.attn_out(last, attention.to(v.dtype) @ v)

        if sfr:
            first = _unit(vit.head(reduced_block(kk)))[:, 1:]
            cosines = (first @ texts.embeddings.float().T).transpose(1, 2)
            patch = images.shape[-1] // grid[1]
            labels = patch_labels(
                images, cosines.reshape(*cosines.shape[:2], *grid), logit_scale, temp_thd, patch
            )
            feedback = feedback_attention(labels, std, keep_entity, prefix)[:, None]
            kk = sfr_tau * ((1 - sfr_lambda) * kk + sfr_lambda * feedback.to(kk.dtype))
        tokens = _unit(vit.head(reduced_block(kk)))[:, 1:]
        stock = _unit(vit.pooled(stock_block(vit, last, x, (q, k, v))))
    return _itsm(backend, images, texts, tokens, stock)
