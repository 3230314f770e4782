"""Gradient methods: Grad-CAM, GAE (Chefer et al.), LeGrad and gScoreCAM.

Every target is a CLIP similarity `s[b, t] = cos(image_embedding_b, text_t)`, never a class
logit. The mechanism lives once here: the tower runs without grad up to the earliest
activation a method reads, that activation is made to require grad, the rest of the tower
builds the graph, and `_similarity_gradients` takes one backward per text, batched over the
images (they are independent, so `∂ Σ_b s[b, t]` gives every image its own gradient).
Gradients are taken with `torch.autograd.grad` on activations only: the model's weights
never get `.grad` and keep `requires_grad=False`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..backend import Backend, Texts
from ..errors import ClipvizError
from ..metrics import normalize_maps
from . import MapResult, Method


def _cosine(embeddings: Tensor, texts: Texts) -> Tensor:
    """`cos(image embedding, text)` `[B, T]`, in float32 (outside autocast on purpose)."""
    text = texts.embeddings.to(embeddings.device).float()
    return F.normalize(embeddings.float(), dim=-1) @ text.T


def _similarity_gradients(
    similarities: Tensor, reads: Sequence[Tensor]
) -> Iterator[tuple[Tensor, ...]]:
    """Per text `t`: `∂(Σ_b s[b, t]) / ∂read` for every tensor in `reads`.

    The graph is shared by all texts, so it is kept until the last one and freed by it.
    """
    count = similarities.shape[1]
    for t in range(count):
        with torch.enable_grad():  # the caller may be under no_grad; never yield inside it
            target = similarities[:, t].sum()
        yield torch.autograd.grad(target, reads, retain_graph=t < count - 1)


def _check_grad_allowed(name: str) -> None:
    if torch.is_inference_mode_enabled():
        raise ClipvizError(f"{name} needs gradients; call it outside torch.inference_mode()")


def _block_index(index: int, count: int, option: str) -> int:
    """A block index that may count from the end (−1 = last), checked against `count`."""
    if not -count <= index < count:
        raise ClipvizError(
            f"{option}={index} is out of range for a tower of {count} blocks; "
            f"use 0…{count - 1}, or −1…−{count} to count from the last block"
        )
    return index % count


def _require_vit(backend: Backend, name: str) -> None:
    if backend.tower != "vit":
        raise ClipvizError(
            f"{name} needs a ViT: it reads the attention of transformer blocks, which a "
            "ResNet tower does not have; use gradcam or gscorecam for ResNet models"
        )


# -- the layers the methods read, as leaves of a graph that ends at the image embedding ------


def _grad_cam_layer(backend: Backend, images: Tensor) -> tuple[Tensor, Tensor]:
    """Grad-CAM's layer, requiring grad, and the image embeddings `[B, D]` computed from it.

    ViT: the output of the last block's `ln_1` `[B, 1+N, W]` (the last block is then computed
    explicitly from it); RN: the `layer4` output `[B, C, h, w]`.
    """
    _check_grad_allowed("Grad-CAM")
    if backend.tower == "vit":
        *before, last = backend.vit_blocks()
        with torch.no_grad():
            x = backend.vit_embed(images)
            for block in before:
                x = backend.run_block(block, x)
            read = last.ln_1(x)
        read.requires_grad_(True)
        q, k, v = backend.attention_qkv(last, read)
        probs = ((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1)
        y = x + last.ls_1(backend.attention_out(last, probs @ v))
        y = y + last.ls_2(last.mlp(last.ln_2(y)))
        return read, backend.vit_head(y)[:, 0]
    with torch.no_grad():
        read = backend.rn_features(images)
    read.requires_grad_(True)
    return read, backend.rn_attention_pool(backend.rn_pool_inputs(read))[:, 0]


def _as_grid(backend: Backend, images: Tensor, layer: Tensor) -> Tensor:
    """Grad-CAM's layer (or its gradient) as a spatial map `[B, C, h, w]`, in float32."""
    if backend.tower == "vit":
        h, w = backend.grid_size(images)
        layer = layer[:, 1:].transpose(1, 2).reshape(layer.shape[0], -1, h, w)
    return layer.float()


def _attention_graph(
    backend: Backend, images: Tensor, first: int, separate_blocks: bool = False
) -> tuple[list[Tensor], list[Tensor]]:
    """Attention probabilities `[B, heads, L, L]` and outputs `[B, L, W]` of blocks `first`…

    The blocks before `first` run without grad. `separate_blocks` cuts the residual stream
    between blocks, so that a target read after block `l` reaches block `l`'s attention but
    no earlier one (LeGrad's per-layer targets then share one backward).
    """
    _check_grad_allowed("this method")
    blocks = backend.vit_blocks()
    with torch.no_grad():
        x = backend.vit_embed(images)
        for block in blocks[:first]:
            x = backend.run_block(block, x)
    probs: list[Tensor] = []
    outputs: list[Tensor] = []
    for block in blocks[first:]:
        if separate_blocks or not outputs:
            x = x.detach().requires_grad_(True)
        x, p = backend.run_block_with_attention(block, x)
        probs.append(p)
        outputs.append(x)
    return probs, outputs


# -- the methods -----------------------------------------------------------------------------


def gradcam(backend: Backend, images: Tensor, texts: Texts) -> MapResult:
    """Grad-CAM on the CLIP similarity: `ReLU(Σ_c α_c A_c)`, `α_c = mean_spatial ∂s/∂A_c`.

    A: the last ViT block's `ln_1` output (patch tokens), or the ResNet's `layer4` output.
    """
    with torch.enable_grad():
        with backend.autocast():
            read, embeddings = _grad_cam_layer(backend, images)
        similarities = _cosine(embeddings, texts)  # [B, T]
    acts = _as_grid(backend, images, read.detach())  # [B, C, h, w]
    maps = []
    for (grad,) in _similarity_gradients(similarities, [read]):
        alpha = _as_grid(backend, images, grad).mean(dim=(2, 3), keepdim=True)  # [B, C, 1, 1]
        maps.append((alpha * acts).sum(dim=1).relu())
    return MapResult(torch.stack(maps, dim=1), F.normalize(embeddings.detach().float(), dim=-1))


def gae(backend: Backend, images: Tensor, texts: Texts, start_layer: int = 0) -> MapResult:
    """Chefer et al.'s relevance: `R = I`, `R += mean_heads(clamp(∇A ⊙ A, min=0)) @ R` per block.

    start_layer: first block whose attention is propagated (0 = all; −1 = the last only;
        negative values count from the end).
    """
    _require_vit(backend, "GAE")
    first = _block_index(start_layer, len(backend.vit_blocks()), "start_layer")
    with torch.enable_grad():
        with backend.autocast():
            probs, outputs = _attention_graph(backend, images, first)
            embeddings = backend.vit_head(outputs[-1])[:, 0]
        similarities = _cosine(embeddings, texts)
    attention = [p.detach().float() for p in probs]
    B, _, L, _ = attention[0].shape
    maps = []
    for grads in _similarity_gradients(similarities, probs):
        # Only row 0 of R = (I + Ā_n)…(I + Ā_first) is read, so it is built as a row vector
        # from the last block back: O(L²) per block instead of O(L³), the same numbers.
        row = torch.zeros(B, 1, L, device=attention[0].device)
        row[:, 0, 0] = 1.0
        for a, g in zip(reversed(attention), reversed(grads), strict=True):
            cam = (g.float() * a).clamp(min=0).mean(dim=1)  # Ā [B, L, L]
            row = row + row @ cam
        maps.append(row[:, 0, 1:])
    h, w = backend.grid_size(images)
    maps_t = torch.stack(maps, dim=1).reshape(B, -1, h, w)
    return MapResult(maps_t, F.normalize(embeddings.detach().float(), dim=-1))


def legrad(backend: Backend, images: Tensor, texts: Texts, layers: int = 2) -> MapResult:
    """LeGrad: `Σ_l mean_{heads, queries} ReLU(∂s_l/∂A_l)` over the last blocks, min-max.

    `s_l = cos(proj(ln_post(x_l[:, 0])), text)` with `x_l` the output of block `l`.
    layers: how many of the last blocks contribute (default 2).
    """
    _require_vit(backend, "LeGrad")
    count = len(backend.vit_blocks())
    if not 1 <= layers <= count:
        raise ClipvizError(f"layers={layers} must be between 1 and the tower's {count} blocks")
    with torch.enable_grad():
        with backend.autocast():
            probs, outputs = _attention_graph(backend, images, count - layers, separate_blocks=True)
            embeddings = [backend.vit_head(x)[:, 0] for x in outputs]
        # Σ_l s_l: with the blocks separated, ∂/∂A_l of the sum is ∂s_l/∂A_l.
        similarities = torch.stack([_cosine(e, texts) for e in embeddings]).sum(dim=0)
    maps = []
    for grads in _similarity_gradients(similarities, probs):
        per_layer = [g.float().clamp(min=0).mean(dim=(1, 2))[:, 1:] for g in grads]  # [B, N]
        maps.append(torch.stack(per_layer).sum(dim=0))
    h, w = backend.grid_size(images)
    maps_t = normalize_maps(torch.stack(maps, dim=1).reshape(len(images), -1, h, w))
    return MapResult(maps_t, F.normalize(embeddings[-1].detach().float(), dim=-1))


def _masked_image_scores(
    backend: Backend, image: Tensor, channels: Tensor, texts: Texts, batch_size: int
) -> Tensor:
    """Score-CAM's masking: each channel `[K, h, w]`, upsampled and min-max normalised, masks
    the preprocessed `image` `[3, H, W]`; returns the softmax over the texts of every masked
    image's similarities `[K, T]`."""
    scores = []
    for i in range(0, len(channels), batch_size):
        up = F.interpolate(
            channels[i : i + batch_size, None], size=image.shape[-2:], mode="bilinear"
        )[:, 0]  # [k, H, W]
        masks = normalize_maps(up)
        embeddings = backend.image_embeddings(image[None] * masks[:, None])  # [k, D]
        scores.append((backend.logit_scale * _cosine(embeddings, texts)).softmax(dim=-1))
    return torch.cat(scores)


def gscorecam(
    backend: Backend, images: Tensor, texts: Texts, topk: int = 300, batch_size: int = 64
) -> MapResult:
    """gScoreCAM: `ReLU(Σ_k score_k A_k)` over the `topk` `layer4` channels of highest mean
    gradient, `score_k` the text's softmax probability of the image masked by channel `k`.

    topk: channels kept per (image, text), clamped to the channel count (default 300).
    batch_size: masked images per forward pass (default 64).
    """
    if backend.tower != "rn":
        raise ClipvizError(
            "gScoreCAM is defined for ResNet towers (RN50, RN101, …); for a ViT use gradcam "
            "(or gae, legrad)"
        )
    if topk < 1 or batch_size < 1:
        raise ClipvizError(f"topk ({topk}) and batch_size ({batch_size}) must be at least 1")
    images = images.to(backend.device)
    with torch.enable_grad():
        with backend.autocast():
            read, embeddings = _grad_cam_layer(backend, images)
        similarities = _cosine(embeddings, texts)
    acts = read.detach().float()  # [B, C, h, w]
    B, C = acts.shape[:2]
    k = min(topk, C)
    kept = torch.stack(
        [
            grad.float().mean(dim=(2, 3)).topk(k, dim=1).indices  # [B, k]
            for (grad,) in _similarity_gradients(similarities, [read])
        ],
        dim=1,
    )  # [B, T, k]
    weights = torch.zeros(B, texts.embeddings.shape[0], C, device=acts.device)  # [B, T, C]
    for b in range(B):
        # A masked image's softmax covers every text at once: score the union of kept channels.
        channels = kept[b].unique()
        scores = torch.zeros(C, weights.shape[1], device=acts.device)  # [C, T]
        scores[channels] = _masked_image_scores(
            backend, images[b], acts[b, channels], texts, batch_size
        )
        chosen = torch.zeros_like(weights[b], dtype=torch.bool).scatter_(1, kept[b], True)
        weights[b] = scores.T * chosen
    maps = torch.einsum("btc,bchw->bthw", weights, acts).relu()
    return MapResult(maps, F.normalize(embeddings.detach().float(), dim=-1))


GRADIENT_METHODS: dict[str, Method] = {
    "gradcam": Method(
        "gradcam",
        gradcam,
        "Grad-CAM on the image-text cosine: channel activations weighted by mean gradients",
        "Selvaraju et al., Grad-CAM: Visual Explanations from Deep Networks via "
        "Gradient-based Localization, ICCV 2017",
    ),
    "gae": Method(
        "gae",
        gae,
        "Gradient-weighted attention relevance propagated through every ViT block",
        "Chefer, Gur and Wolf, Generic Attention-model Explainability for Interpreting "
        "Bi-Modal and Encoder-Decoder Transformers, ICCV 2021",
        towers=("vit",),
        options=("start_layer",),
    ),
    "legrad": Method(
        "legrad",
        legrad,
        "Positive gradients of per-layer similarities w.r.t. the last blocks' attention",
        "Bousselham, Boggust, Chaybouti, Strobelt and Kuehne, LeGrad: An Explainability "
        "Method for Vision Transformers via Feature Formation Sensitivity, ICCV 2025 "
        "(arXiv:2404.03214, 2024)",
        towers=("vit",),
        options=("layers",),
    ),
    "gscorecam": Method(
        "gscorecam",
        gscorecam,
        "Score-CAM over the top-gradient layer4 channels, scored by masked-image softmax",
        "Chen, Li, Biaz, Bui and Nguyen, gScoreCAM: What Objects Is CLIP Looking At?, ACCV 2022",
        towers=("rn",),
        options=("topk", "batch_size"),
    ),
}
