"""Class-activation maps of a CLIP similarity: Grad-CAM and gScoreCAM.

Both read one layer's activations `A` `[B, C, h, w]` and weight its channels, `ReLU(Σ_c w_c
A_c)`: `channel_cam` is that mechanism once (as pytorch-grad-cam's `base_cam.py`), and each
method gives only its weights (its `get_cam_weights`): Grad-CAM the mean gradient of the
similarity, gScoreCAM the scores of the image masked by each of the channels with the largest
gradients. The gradient mechanism is in `gradients.py`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from ..backend import Backend, Texts
from ..backend.towers import MAP, RESNET, TOKENS
from ..errors import ClipvizError
from .gradients import block_index, check_grad_allowed, cosine, similarity_gradients, unit
from .registry import MapResult, register


def cam_layer(backend: Backend, images: Tensor, layer: int) -> tuple[Tensor, Tensor]:
    """The activations a CAM reads, requiring grad, and the image embeddings `[B, D]`
    computed from them, as a spatial map `[B, C, h, w]` is read by `as_grid`.

    ViT: the output of block `layer`'s `ln_1` `[B, 1+N, W]` (that block is then computed
    explicitly from it, the later ones stock); RN: the output of stage `layer`
    (`layer4` = −1) `[B, C, h, w]`; convolutional towers: the final map (−1, after the
    trunk's last norm) or the output of stage `layer` `[B, C, h, w]`.
    """
    check_grad_allowed("Grad-CAM")
    if backend.tower == TOKENS:
        vit = backend.vit
        i = block_index(layer, vit.depth, "layer", "gradcam", getattr(vit, "depth_unit", "blocks"))
        with torch.no_grad():
            x = vit.run_blocks(vit.embed(images), stop=i)
            read = vit.norm1(i, x)
        read.requires_grad_(True)
        y, _ = vit.block_with_attention(i, x, normed=read)
        return read, vit.pooled(vit.run_blocks(y, start=i + 1))
    if backend.tower == MAP:
        conv = backend.conv
        if layer == -1:
            with torch.no_grad():
                read = conv.features(images)
            read.requires_grad_(True)
            return read, conv.pooled(read)
        i = block_index(layer, conv.depth, "layer", "gradcam")
        return conv.stage_output(images, i)
    rn = backend.rn
    i = block_index(layer, rn.depth, "layer", "gradcam")
    with torch.no_grad():
        read = rn.run_stages(rn.stem(images), stop=i + 1)
    read.requires_grad_(True)
    features = rn.run_stages(read, start=i + 1)
    return read, rn.pooled(rn.pool_inputs(features))


def as_grid(backend: Backend, images: Tensor, layer: Tensor) -> Tensor:
    """A CAM layer (or its gradient) as a spatial map `[B, C, h, w]`, in float32."""
    if backend.tower == TOKENS:
        h, w = backend.grid_size(images)
        layer = layer[:, backend.vit.prefix :].transpose(1, 2).reshape(layer.shape[0], -1, h, w)
    return layer.float()


# (activations `[B, C, h, w]`, mean gradients of each text's similarity `[B, T, C]`) ->
# channel weights `[B, T, C]`
ChannelWeights = Callable[[Tensor, Tensor], Tensor]


def channel_cam(
    backend: Backend,
    images: Tensor,
    texts: Texts,
    read_layer: Callable[[Backend, Tensor], tuple[Tensor, Tensor]],
    weigh: ChannelWeights,
) -> MapResult:
    """The class-activation map of every (image, text): `ReLU(Σ_c w_c A_c)` `[B, T, h, w]`.

    read_layer: `(backend, images)` -> the activations read, requiring grad, and the image
        embeddings computed from them (`cam_layer`).
    weigh: the channel weights from the activations as a grid and the spatial mean of each
        text's cosine gradient (a method's own part, pytorch-grad-cam's `get_cam_weights`).
    """
    with torch.enable_grad():
        with backend.autocast():
            read, embeddings = read_layer(backend, images)
        similarities = cosine(embeddings, texts)  # [B, T]
    acts = as_grid(backend, images, read.detach())  # [B, C, h, w]
    mean_grads = torch.stack(
        [
            as_grid(backend, images, grad).mean(dim=(2, 3))  # [B, C]
            for (grad,) in similarity_gradients(similarities, [read])
        ],
        dim=1,
    )  # [B, T, C]
    weights = weigh(acts, mean_grads)
    # the weighted sum as base_cam.py computes it, one text at a time
    maps = [(w[:, :, None, None] * acts).sum(dim=1).relu() for w in weights.unbind(dim=1)]
    return MapResult(torch.stack(maps, dim=1), unit(embeddings))


@register(
    "gradcam",
    towers=(TOKENS, RESNET, MAP),
    ranges={"layer": "[-256, 255]"},
    needs={TOKENS: ("attention",)},
    summary="Grad-CAM on the image-text cosine: channel activations weighted by mean gradients",
    citation="Selvaraju et al., Grad-CAM: Visual Explanations from Deep Networks via "
    "Gradient-based Localization, ICCV 2017",
    reference="jacobgil/pytorch-grad-cam, pytorch_grad_cam/grad_cam.py (GradCAM.get_cam_weights) "
    "with a ViT reshape transform; target: the image-text cosine",
    defaults="the last block's `ln_1` output (ViT), `layer4` (RN), the final map after the trunk's "
    "norm (conv); weights: mean gradients of `cos(image, text)` per channel, ReLU of the "
    "weighted sum",
)
def gradcam(backend: Backend, images: Tensor, texts: Texts, layer: int = -1) -> MapResult:
    """Grad-CAM on the CLIP similarity: `ReLU(Σ_c α_c A_c)`, `α_c = mean_spatial ∂s/∂A_c`.

    layer: ViT: the block whose `ln_1` output is read (−1 = the last); RN: the residual
        stage whose output is read (−1 = `layer4`); convolutional towers: the final map (−1)
        or a stage's output (0 … stages − 2, or −2 … to count from the last).
    """
    return channel_cam(
        backend,
        images,
        texts,
        lambda backend, images: cam_layer(backend, images, layer),
        lambda acts, mean_grads: mean_grads,
    )


def _channel_masks(channels: Tensor, size: tuple[int, int]) -> Tensor:
    """Score-CAM's masks as the reference builds them: each channel `[K, h, w]` upsampled
    with `nn.UpsamplingBilinear2d` (corners aligned) to the input size and normalised as
    `(x − min) / (max − min + 1e-6)` -> `[K, H, W]`."""
    up = F.interpolate(channels[:, None], size=size, mode="bilinear", align_corners=True)[:, 0]
    flat = up.flatten(1)
    lo, hi = flat.min(dim=1, keepdim=True).values, flat.max(dim=1, keepdim=True).values
    return ((flat - lo) / (hi - lo + 1e-6)).view_as(up)


def _masked_image_logits(
    backend: Backend, image: Tensor, channels: Tensor, texts: Texts, batch_size: int
) -> Tensor:
    """`logit_scale · cos` of the preprocessed `image` `[3, H, W]` masked by each channel,
    with every text: `[K, T]` (a NaN score counts 0, as in the reference)."""
    logits = []
    for i in range(0, len(channels), batch_size):
        size = (image.shape[-2], image.shape[-1])
        masks = _channel_masks(channels[i : i + batch_size], size)  # [k, H, W]
        embeddings = backend.image_embeddings(image[None] * masks[:, None])  # [k, D]
        logits.append(backend.logit_scale * cosine(embeddings, texts))
    return torch.cat(logits).nan_to_num(nan=0.0)


def _last_features(backend: Backend, images: Tensor) -> tuple[Tensor, Tensor]:
    """What gScoreCAM reads, requiring grad, and the image embeddings computed from it. ViT:
    the last block's output `[B, prefix + N, W]` (the reference's `resblocks[-1]`, its
    reshape transform dropping the class token; `as_grid` drops every prefix token); RN:
    `layer4`'s output; convolutional towers: the final map."""
    if backend.tower != TOKENS:
        return cam_layer(backend, images, -1)
    check_grad_allowed("gScoreCAM")
    vit = backend.vit
    with torch.no_grad():
        read = vit.run_blocks(vit.embed(images))
    read.requires_grad_(True)
    return read, vit.pooled(read)


@register(
    "gscorecam",
    towers=(TOKENS, RESNET, MAP),
    ranges={"topk": "[1, 65536]", "batch_size": "[1, 4096]"},
    summary="Score-CAM over the top-gradient channels of the last layer, weighted by a softmax "
    "over the channels of the masked images' logits",
    citation="Chen, Li, Biaz, Bui and Nguyen, gScoreCAM: What Objects Is CLIP Looking At?, "
    "ACCV 2022",
    reference="anguyen8/gScoreCAM, pytorch_grad_cam/gscore_cam.py (get_cam_weights) and "
    "base_cam.py, called as in predict.py; ViT: model_loader/clip_loader.py (target "
    "`resblocks[-1]`, reshape_transform)",
    defaults="top 300 channels by mean gradient (RN: `layer4`; ViT: the last block's output, "
    "`resblocks[-1]`, without the class token, as `model_loader/clip_loader.py` targets it;"
    " conv: the final map); masks upsampled with `UpsamplingBilinear2d` and normalised `(x "
    "− min)/(max − min + 1e-6)`; the masked image's raw logit `logit_scale · cos` for the "
    "text; a softmax over **all** channels (0 for those not kept); batches of 128",
)
def gscorecam(
    backend: Backend,
    images: Tensor,
    texts: Texts,
    topk: int = 300,
    batch_size: int = 128,
    score: Literal["logit", "text_softmax"] = "logit",
    channel_softmax: bool = True,
) -> MapResult:
    """gScoreCAM: `ReLU(Σ_c w_c A_c)` on `A`: ViT: the last block's output tokens as a grid
    (channels = width); RN: `layer4`; convolutional towers: the final map. Per (image, text), the `topk` channels
    of highest mean gradient each mask the image; the masked image's score for the text gives
    `s_c` (0 for the channels not kept) and `w = softmax_c(s)` over all channels.

    topk: channels kept per (image, text), clamped to the channel count.
    batch_size: masked images per forward pass.
    score: logit (`logit_scale · cos` of the masked image with the text, the reference) or
        text_softmax (the softmax of those logits over the texts given).
    channel_softmax: weights by the softmax over all channels (the reference); False uses the
        scores of the kept channels as they are.
    """
    if topk < 1 or batch_size < 1:
        raise ClipvizError(
            f"gscorecam: topk ({topk}) and batch_size ({batch_size}) must be at least 1"
        )

    def weigh(acts: Tensor, mean_grads: Tensor) -> Tensor:
        B, T, C = mean_grads.shape
        kept = mean_grads.topk(min(topk, C), dim=2).indices  # [B, T, k]
        weights = torch.zeros(B, T, C, device=acts.device)  # [B, T, C]
        for b in range(B):
            # A masked image's score for one text does not depend on the others: score the
            # union of the channels kept for any text once, with every text.
            channels = kept[b].unique()
            logits = torch.zeros(C, T, device=acts.device)  # [C, T]
            logits[channels] = _masked_image_logits(
                backend, images[b], acts[b, channels], texts, batch_size
            )
            scores = logits.softmax(dim=1) if score == "text_softmax" else logits
            chosen = torch.zeros(T, C, dtype=torch.bool, device=acts.device)
            kept_scores = scores.T * chosen.scatter_(1, kept[b], True)  # [T, C], 0 if not kept
            weights[b] = kept_scores.softmax(dim=1) if channel_softmax else kept_scores
        return weights

    # the cosine's gradient ranks the channels as the logit's does (a positive multiple)
    return channel_cam(backend, images, texts, _last_features, weigh)
