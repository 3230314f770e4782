"""ProxyCLIP: CLIP's last-block values mixed by the attention of a proxy vision model.

A vision foundation model (DINO ViT-B/8 by default; `clipviz.segment.proxy` loads it with
timm) sees the image normalised its own way; its final-normed patch tokens, unit length, give
the patch affinity `S = f fᵀ`, which becomes an attention by `softmax(γ (S − β · mean S))`
with negative entries left out. CLIP's last block contributes only its values (from `ln_1`),
resized to the proxy's grid; the mixed values go through `out_proj`, with no residual and no
MLP, then `ln_post` and `proj`. The maps lie on the proxy's grid.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..backend import Backend, Texts
from ..backend.towers import TOKENS
from ..errors import ClipvizError
from .kernels import normalized, similarity_maps, stock_block
from .registry import MapResult, register


def proxy_attention(features: torch.Tensor, beta: float, gamma: float) -> torch.Tensor:
    """ProxyCLIP's attention `[B, M, M]` from proxy patch features `[B, M, C]`: with `S` the
    cosine of every pair, `softmax(γ (S − β · mean S))` per row, entries below 0 left out
    (the mean over all of an image's pairs). A token always keeps itself: where every entry
    of its row is below 0 (the reference divides 0 by 0 there) it attends to itself alone."""
    f = F.normalize(features.float(), dim=-1)
    similarity = f @ f.transpose(1, 2)
    mean = similarity.mean(dim=(1, 2), keepdim=True)
    logits = (similarity - mean * beta) * gamma
    eye = torch.eye(logits.shape[-1], dtype=torch.bool, device=logits.device)
    return logits.masked_fill((logits < 0) & ~eye, float("-inf")).softmax(dim=-1)


@register(
    "proxyclip",
    towers=(TOKENS,),
    needs={TOKENS: ("attention", "readout")},
    ranges={"beta": "[-10, 10]", "gamma": "(0, 100]"},
    summary="ProxyCLIP: the last block's values mixed by a proxy model's thresholded patch "
    "affinity (DINO ViT-B/8 by default), no residual or MLP, cosine on the proxy's grid",
    citation="Mengcheng Lan, Chaofeng Chen, Yiping Ke, Xinjiang Wang, Litong Feng, Wayne Zhang: "
    "ProxyCLIP: Proxy Attention Improves CLIP for Open-Vocabulary Segmentation, ECCV 2024",
    reference="mc-lan/ProxyCLIP, proxyclip_segmentor.py (forward_feature, forward_slide) and "
    "open_clip/transformer.py (VisionTransformer.custom_attn)",
    defaults="proxy DINO ViT-B/8 (timm vit_base_patch8_224.dino) on ImageNet-normalised "
    "input, its final-normed patch tokens; beta 1.2, gamma 3.0 (the proxyclip presets pad "
    "windows to a multiple of 56)",
)
def proxyclip(
    backend: Backend,
    images: torch.Tensor,
    texts: Texts,
    proxy: str = "vit_base_patch8_224.dino",
    beta: float = 1.2,
    gamma: float = 3.0,
) -> MapResult:
    """ProxyCLIP: proxy attention over CLIP's last-block values, then the cosine.

    proxy: the proxy model: a timm name whose weights are cached, NAME=FILE (a weights file
        for that architecture), or a folder with timm's config.json and model.safetensors.
    beta: how many times the mean affinity is taken off every affinity.
    gamma: the scale of the attention logits (an inverse temperature).

    With `x` CLIP's stream after all blocks but the last and `f` the proxy's patch tokens
    of the same input, re-normalised from CLIP's mean/std to the proxy's: the last block's
    values `v` (from `ln_1(x)`, the patches) bilinearly resized to the proxy's grid,
    `out_proj(proxy_attention(f) v)`, `ln_post`, `proj`, normalise, cosine with the texts;
    the maps lie on the proxy's grid. Each model leaves out the pixels past its own last
    whole patch (inputs need not be a multiple of CLIP's patch). Global embeddings: stock,
    when CLIP sees the whole input.
    """
    from ..segment.proxy import attached_proxy

    vit = backend.readout_vit
    model = attached_proxy(backend, proxy)
    size = (int(images.shape[-2]), int(images.shape[-1]))
    native = backend.input_size
    grid, clip_grid = model.grid(*size), backend.vision.grid(size)
    if min(grid) < 1 or min(clip_grid) < 1:
        raise ClipvizError(f"proxyclip: a {size[0]}x{size[1]} input is smaller than one patch")
    # as CLIP's patch convolution, the pixels past its last whole patch are not seen
    native_grid = backend.vision.grid(native)
    ph, pw = native[0] // native_grid[0], native[1] // native_grid[1]
    seen = images[..., : clip_grid[0] * ph, : clip_grid[1] * pw]
    mean, std = backend.preprocess.mean, backend.preprocess.std
    last = vit.depth - 1
    with torch.no_grad(), backend.autocast():
        features = model.tokens(model.renormalize(images, mean, std))  # [B, M, C]
        attention = proxy_attention(features, beta, gamma)  # [B, M, M]
        x = vit.run_blocks(vit.embed(seen), stop=last)
        _, _, v = vit.qkv(last, vit.norm1(last, x))  # [B, heads, prefix + N, d]
        b, heads, _, d = v.shape
        values = v[:, :, vit.prefix :].reshape(b * heads, *clip_grid, d).permute(0, 3, 1, 2)
        values = F.interpolate(values.float(), size=grid, mode="bilinear", align_corners=False)
        values = values.flatten(2).transpose(1, 2).reshape(b, heads, -1, d)
        mixed = (attention[:, None] @ values).to(v.dtype)  # the same attention in every head
        out = vit.attn_out(last, mixed)
        tokens = normalized(vit.head(torch.cat([x[:, : vit.prefix], out], dim=1)))[:, 1:]
        stock = None
        if seen.shape == images.shape:  # the stock forward, on the way
            qkv = vit.qkv(last, vit.norm1(last, x))
            stock = normalized(vit.pooled(stock_block(vit, last, x, qkv)))
    maps = similarity_maps(tokens, texts.embeddings.float(), grid)
    return MapResult(maps, image_embeddings=stock)
