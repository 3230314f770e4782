"""CASS: object-level context for training-free open-vocabulary segmentation, on NACLIP's
reduced last block (no residual, no MLP, a Gaussian neighbourhood prior on the attention).

Spectral object-level context distillation: per head, the patch graph of CLIP's last block
(`k kᵀ`) and the graph of a vision foundation model (the proxy, DINO ViT-B/8 by default:
its last block's keys resized to CLIP's grid) are compared by their top eigenvalues; heads
are paired by an optimal assignment, and each CLIP graph is mixed with a low-rank version of
its proxy graph before the softmax. Object-level context for the texts: the names are
clustered (Ward); within each cluster, the name the image's embedding prefers moves towards
the mean of its two best patches; the patch cosines are then mixed with the image-level ones.

Everything here follows the authors' code (MICV-yonsei/CASS @228ecdd: `clip/model.py`
`VisionTransformer.forward`, `custom_attn` and `_apply_spectral_strategy`;
`cass_segmentor.py` `hierarchical_clustering`, `hierarchical_prompt`, `forward_feature`),
with scipy's `linear_sum_assignment` and Ward `linkage`/`fcluster` and scikit-learn's
`cosine_distances` written out in numpy. The graph math (the spectral matching and those
routines) lives in `cass_graphs.py`; this module holds the proxy's keys, the texts' context
and the method.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from ..backend import Backend, Texts
from ..backend.towers import TOKENS
from ..errors import ClipvizError
from .cass_graphs import cosine_distances, spectral_context, ward_clusters
from .cass_graphs import min_cost_assignment as min_cost_assignment
from .kernels import embedding_rows, normalized, stock_block
from .registry import MapResult, register
from .selfattention import neighbourhood_bias

if TYPE_CHECKING:
    from ..segment.proxy import Proxy

# hierarchical_prompt: the patches whose mean moves a name (`_compute_topk_similarities`, k=2)
TOP_PATCHES = 2
# forward_feature's `inv_normalize` of the CLIP-normalised window before the proxy: ImageNet's
# mean and std, the third std written 0.255 (ImageNet's is 0.225), whatever CLIP's own are
INVERSE_MEAN = (0.485, 0.456, 0.406)
INVERSE_STD = (0.229, 0.224, 0.255)


# -- the proxy's keys on CLIP's heads -------------------------------------------------------


def proxy_input(images: torch.Tensor, proxy: Proxy, side: int) -> torch.Tensor:
    """The proxy's input from CLIP-normalised windows `[B, 3, h, w]`: as `forward_feature`
    and `VisionTransformer.forward` make it, the window un-normalised with `INVERSE_MEAN` and
    `INVERSE_STD`, truncated to 8-bit, resized to a `side`² square (PIL's bicubic, here with
    torch's antialiased bicubic, rounded to 8-bit), cut to whole patches and normalised with
    the proxy's own mean and std."""
    shape = (1, 3, 1, 1)

    def col(v: tuple[float, ...]) -> torch.Tensor:
        return torch.tensor(v, device=images.device, dtype=torch.float32).view(shape)

    pixels = (images.float() * col(INVERSE_STD) + col(INVERSE_MEAN)) * 255
    pixels = pixels.clamp(0, 255).floor()
    if tuple(pixels.shape[-2:]) != (side, side):
        pixels = F.interpolate(pixels, size=(side, side), mode="bicubic", antialias=True,
                               align_corners=False).round().clamp(0, 255)  # fmt: skip
    ph, pw = proxy.patch_size
    pixels = pixels[..., : side - side % ph, : side - side % pw]
    return (pixels / 255 - col(proxy.mean)) / col(proxy.std)


def proxy_keys(
    proxy: Proxy, images: torch.Tensor, grid: tuple[int, int], side: int
) -> torch.Tensor:
    """The proxy's last-block patch keys `[B, C, N]` on CLIP's `grid`: its `C` key channels
    (head after head) bilinearly resized from its own grid (`proxy_input` at `side`)."""
    x = proxy_input(images, proxy, side)
    _, k, _ = proxy.qkv(x, -1)
    k = k[:, :, proxy.prefix :].float()  # [B, Hp, Np, d]
    B, hp, _, d = k.shape
    maps = k.permute(0, 1, 3, 2).reshape(B, hp * d, *proxy.grid(*x.shape[-2:]))
    maps = F.interpolate(maps, size=grid, mode="bilinear", align_corners=False)
    return maps.flatten(2)


def key_range(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """`source` min–max rescaled onto `target`'s range over all its values, per image of
    `[B, …]` (`_normalize_key_range`)."""
    s_low, s_high = source.flatten(1).aminmax(dim=1)
    t_low, t_high = target.flatten(1).aminmax(dim=1)
    span = (s_high - s_low).clamp_min(torch.finfo(source.dtype).tiny)
    shape = (-1,) + (1,) * (source.dim() - 1)
    ratio = ((t_high - t_low) / span).view(shape)
    return (source - s_low.view(shape)) * ratio + t_low.view(shape)


def key_groups(keys: torch.Tensor, heads: int) -> torch.Tensor:
    """Key channels `[B, C, N]` shared out to `heads` in order `[B, heads, N, ⌈C / heads⌉]`,
    as the reference reshapes the proxy's keys into CLIP's heads (DINO ViT-B and CLIP ViT-B:
    12 heads of 64 either way); for other widths groups as equal as `C` allows, the smaller
    ones padded with zero channels (which leave their graphs `k kᵀ` as they are)."""
    groups = torch.tensor_split(keys, heads, dim=1)
    width = max(g.shape[1] for g in groups)
    padded = [F.pad(g, (0, 0, 0, width - g.shape[1])) for g in groups]  # [B, width, N] each
    return torch.stack(padded, dim=1).transpose(-2, -1)


# -- object-level context for the texts ----------------------------------------------------


def name_clusters(texts: torch.Tensor, threshold: float) -> torch.Tensor:
    """Each name's cluster `[Q]` (`hierarchical_clustering`): Ward on the cosine distances of
    the text embeddings `[Q, D]`, cut at `threshold`."""
    if len(texts) < 2:
        return torch.zeros(len(texts), dtype=torch.long)
    distances = cosine_distances(texts.detach().double().cpu().numpy())
    return torch.from_numpy(ward_clusters(distances, threshold))


def object_texts(
    patches: torch.Tensor,
    texts: torch.Tensor,
    global_scores: torch.Tensor,
    clusters: torch.Tensor,
    weight: float,
) -> torch.Tensor:
    """Per image the text embeddings `[B, Q, D]` with object-level context
    (`hierarchical_prompt`): in each cluster of names, the name whose text the image's
    embedding matches best (`global_scores` `[B, Q]`) becomes
    `n((1 − weight) t + weight · n(mean of its TOP_PATCHES best patches))`; the others stay.
    patches: unit patch tokens `[B, N, D]`; texts: unit `[Q, D]`; clusters: `[Q]`."""
    B, Q = global_scores.shape
    member = F.one_hot(clusters.to(global_scores.device)).T.bool()  # [C, Q]
    masked = torch.where(member[None], global_scores[:, None, :], -torch.inf)  # [B, C, Q]
    chosen = F.one_hot(masked.argmax(dim=-1), Q).sum(dim=1).bool()  # [B, Q]
    scores = patches @ texts.T  # [B, N, Q]
    top = scores.topk(min(TOP_PATCHES, patches.shape[1]), dim=1).indices  # [B, k, Q]
    best = torch.gather(
        patches[:, :, None].expand(-1, -1, Q, -1), 1,
        top[..., None].expand(-1, -1, -1, patches.shape[-1]),
    )  # fmt: skip
    mean = F.normalize(best.mean(dim=1), dim=-1)  # [B, Q, D]
    moved = F.normalize((1 - weight) * texts[None] + weight * mean, dim=-1)
    return torch.where(chosen[..., None], moved, texts[None].expand(B, -1, -1))


# -- the method ----------------------------------------------------------------------------


def cass_maps(
    backend: Backend,
    images: torch.Tensor,
    texts: Texts,
    proxy: Proxy,
    global_embeddings: torch.Tensor | None = None,
    global_semantics_weight: float = 0.25,
    mean_vector_weight: float = 0.04,
    h_threshold: float = 0.09,
    std: float = 5.0,
    stretch: bool = True,
    proxy_side: int = 0,
) -> MapResult:
    """CASS's patch scores `[B, Q, h, w]` of `images` (CLIP-normalised) with a loaded `proxy`.

    global_embeddings: the unit image embeddings `[B, D]` the image-level scores come from
    (the reference's whole resized image for each of its windows); None: each input's own.
    The other arguments are `cass`'s options.
    """
    vit = backend.vit
    last = vit.depth - 1
    grid = backend.grid_size(images)
    prefix = vit.prefix
    omega = backend.memo(
        ("naclip-bias", grid, 0, std), lambda: neighbourhood_bias(grid, 0, std).to(images.device)
    )
    side = proxy_side or min(int(images.shape[-2]), int(images.shape[-1]))
    if side < max(proxy.patch_size):
        raise ClipvizError(
            f"cass: the proxy {proxy.spec} would see a {side}x{side} input, smaller than one "
            f"of its {proxy.patch_size[0]}x{proxy.patch_size[1]} patches; use a larger "
            "short_side or window, or proxy_side"
        )
    with torch.no_grad():
        with backend.autocast():
            x = vit.run_blocks(vit.embed(images), stop=last)
            q, k, v = vit.qkv(last, vit.norm1(last, x))
            stock = normalized(
                vit.pooled(stock_block(vit, last, x, (q, k, v), embedding_rows(vit)))
            )
        keys = k[:, :, prefix:].float()  # [B, H, N, d]: the class token leaves the block
        scale = k.shape[-1] ** -0.5
        guide = key_range(proxy_keys(proxy, images, grid, side).to(keys.device), keys)
        guide = key_groups(guide, vit.heads)
        logits = torch.stack(
            [spectral_context(c, p, scale, stretch) for c, p in zip(keys, guide, strict=True)]
        )
        attention = (logits + omega.double()).softmax(dim=-1)
        with backend.autocast():
            out = vit.attn_out(last, attention.to(v.dtype) @ v[:, :, prefix:])
            stream = torch.cat([out.new_zeros(out.shape[0], prefix, out.shape[-1]), out], dim=1)
            tokens = normalized(vit.head(stream))[:, 1:]  # [B, N, D]: the head keeps token 0
    text = texts.embeddings.float().to(tokens.device)
    image = stock if global_embeddings is None else normalized(global_embeddings)
    global_scores = image.to(tokens.device) @ text.T  # [B, Q]
    clusters = name_clusters(text, h_threshold)
    adjusted = object_texts(tokens, text, global_scores, clusters, mean_vector_weight)
    scores = tokens @ adjusted.transpose(1, 2)  # [B, N, Q]
    g = global_semantics_weight
    mixed = (1 - g) * scores + g * global_scores[:, None]
    return MapResult(mixed.transpose(1, 2).reshape(len(images), -1, *grid), image_embeddings=stock)


@register(
    "cass",
    towers=(TOKENS,),
    ranges={
        "global_semantics_weight": "[0, 1]",
        "mean_vector_weight": "[0, 1]",
        "h_threshold": "[0, 1000]",
        "std": "[0.1, 1000]",
        "proxy_side": "[0, 4096]",
    },
    needs={TOKENS: ("attention", "class_token")},
    summary="CASS: NACLIP's last block with a proxy model's (DINO's) patch graph mixed in per "
    "head by spectral matching, and the names moved towards their best patches, cosine",
    citation="Chanyoung Kim, Dayun Ju, Woojung Han, Ming-Hsuan Yang, Seong Jae Hwang: "
    "Distilling Spectral Graph for Object-Context Aware Open-Vocabulary Semantic "
    "Segmentation, CVPR 2025",
    reference="MICV-yonsei/CASS, clip/model.py (VisionTransformer.forward, custom_attn with "
    "arch 'reduced' and attn_strategy 'spectral'), cass_segmentor.py (hierarchical_clustering, "
    "hierarchical_prompt, forward_feature)",
    defaults="proxy DINO ViT-B/8 (vit_base_patch8_224.dino) on the window's short side; 20 "
    "eigenvalues, rank 10, proxy weight 10, singular values stretched; Gaussian std 5; "
    "global_semantics_weight 0.25, mean_vector_weight 0.04, h_threshold 0.09 — the authors' "
    "PASCAL Context values (they tune the three per benchmark); image-level scores from each "
    "input's own embedding (clipviz segment: the whole resized image's, as the reference)",
)
def cass(
    backend: Backend,
    images: torch.Tensor,
    texts: Texts,
    proxy: str = "vit_base_patch8_224.dino",
    global_semantics_weight: float = 0.25,
    mean_vector_weight: float = 0.04,
    h_threshold: float = 0.09,
    std: float = 5.0,
    stretch: bool = True,
    proxy_side: int = 0,
    whole_image: bool = True,
) -> MapResult:
    """CASS: spectral object-level context in NACLIP's reduced last block, object-level
    context for the texts, image-level scores mixed in.

    proxy: the vision model whose last-block keys give the object graph: a timm name with
        its pretrained tag, NAME=FILE, or a folder with config.json and model.safetensors.
    global_semantics_weight: the share of the image-level cosine in every patch's score.
    mean_vector_weight: how far the best name of each cluster moves towards its two best
        patches.
    h_threshold: the Ward distance up to which names share a cluster.
    std: NACLIP's Gaussian prior, in patches.
    stretch: stretch the proxy graph's singular values to [min/2, 1.5·max] (the reference
        does not on VOC20 and Cityscapes).
    proxy_side: the square side the proxy sees each input at (0: the input's short side,
        the reference's DINO ViT-B/8; 518 for its DINOv2 ViT-B/14).
    whole_image: in `clipviz segment`, the image-level scores of every window come from the
        whole resized image (off: from the window itself, as the reference on Cityscapes).

    Last block: `A = softmax(spectral_context(k, k_proxy) + ω)`, `attn_out(A v)` over the
    patches, no residual, no MLP; `ln_post`, `proj`, normalise; scores
    `(1 − g) · tokens @ object_texts(…)ᵀ + g · embedding @ textsᵀ`.
    """
    return cass_maps(
        backend, images, texts, _proxy(backend, proxy), None, global_semantics_weight,
        mean_vector_weight, h_threshold, std, stretch, proxy_side,
    )  # fmt: skip


def _proxy(backend: Backend, spec: str) -> Proxy:
    """The proxy `spec` names, loaded once per backend (shared with ProxyCLIP)."""
    from ..segment.proxy import load_proxy, proxy_stamp  # segment imports the methods

    return backend.memo(("proxy", *proxy_stamp(spec)), lambda: load_proxy(spec, backend.device))


def with_image_embeddings(
    backend: Backend,
    images: torch.Tensor,
    texts: Texts,
    image_embeddings: torch.Tensor,
    proxy: str = "vit_base_patch8_224.dino",
    whole_image: bool = True,
    **options: Any,
) -> MapResult:
    """`cass` on windows `images`, with the image-level scores from `image_embeddings`
    `[B, D]` (each window's whole image, as the segmenter gives them and the reference's
    `forward_slide` computes them), or from each window's own with whole_image off (the
    reference on Cityscapes)."""
    given = image_embeddings if whole_image else None
    return cass_maps(backend, images, texts, _proxy(backend, proxy), given, **options)


# what `clipviz segment` runs on each window in place of the method (`Segmenter.window_maps`)
cass.with_image_embeddings = with_image_embeddings  # type: ignore[attr-defined]
