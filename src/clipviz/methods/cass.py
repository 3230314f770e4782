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
`cosine_distances` written out in numpy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from ..backend import Backend, Texts
from ..backend.towers import TOKENS
from ..errors import ClipvizError
from .kernels import embedding_rows, normalized, stock_block
from .registry import MapResult, register
from .selfattention import neighbourhood_bias

if TYPE_CHECKING:
    from ..segment.proxy import Proxy

# custom_attn's config: the eigenvalues compared per head ('k_eigen'), the proxy graph's
# weight ('scale_factor'); optimal_q's first rank (see `low_rank`)
EIGENVALUES = 20
PROXY_WEIGHT = 10.0
RANK = 10
# hierarchical_prompt: the patches whose mean moves a name (`_compute_topk_similarities`, k=2)
TOP_PATCHES = 2
# forward_feature's `inv_normalize` of the CLIP-normalised window before the proxy: ImageNet's
# mean and std, the third std written 0.255 (ImageNet's is 0.225), whatever CLIP's own are
INVERSE_MEAN = (0.485, 0.456, 0.406)
INVERSE_STD = (0.229, 0.224, 0.255)


# -- scipy and scikit-learn, written out -------------------------------------------------


def _hungarian(cost: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A least-cost assignment of a square matrix (the column of each row) and the dual
    potentials of rows and columns: shortest augmenting paths, O(n³)."""
    n = cost.shape[0]
    # 1-based potentials and matches; column 0 is the augmenting path's virtual start
    u, v = np.zeros(n + 1), np.zeros(n + 1)
    row_of = np.zeros(n + 1, dtype=np.int64)  # the row matched to each column (0: none)
    for row in range(1, n + 1):
        row_of[0], col = row, 0
        slack = np.full(n + 1, np.inf)
        previous = np.zeros(n + 1, dtype=np.int64)
        used = np.zeros(n + 1, dtype=bool)
        while row_of[col]:
            used[col] = True
            r = row_of[col]
            free = ~used
            free[0] = False
            reduced = cost[r - 1] - u[r] - v[1:]
            better = free[1:] & (reduced < slack[1:])
            slack[1:] = np.where(better, reduced, slack[1:])
            previous[1:] = np.where(better, col, previous[1:])
            nxt = int(np.argmin(np.where(free, slack, np.inf)))
            delta = slack[nxt]
            u[row_of[used]] += delta
            v[used] -= delta
            slack[~used] -= delta
            col = nxt
        while col:  # flip the matches along the path
            row_of[col] = row_of[previous[col]]
            col = previous[col]
    out = np.empty(n, dtype=np.int64)
    out[row_of[1:] - 1] = np.arange(n)
    return out, u[1:], v[1:]


def _completes(allowed: np.ndarray, rows: list[int], cols: list[int]) -> bool:
    """Whether `rows` can each take a different one of `cols` along `allowed` edges (Kuhn's
    augmenting paths)."""
    match: dict[int, int] = {}  # column -> row

    def place(r: int, seen: set[int]) -> bool:
        for c in cols:
            if allowed[r, c] and c not in seen:
                seen.add(c)
                if c not in match or place(match[c], seen):
                    match[c] = r
                    return True
        return False

    return all(place(r, set()) for r in rows)


def min_cost_assignment(cost: np.ndarray, tolerance: float = 1e-6) -> np.ndarray:
    """For a square cost matrix, the column of each row `[n]` that minimises the total cost
    (scipy's `linear_sum_assignment`), Hungarian.

    CASS's costs tie often (two heads' spectra can differ by the same amount from every
    other head's), and the reference's float noise then picks the pairing; here the pairing
    whose columns, read row by row, come first among the least-cost ones, an edge counting as
    least-cost while its reduced cost (the cost less the optimal duals) is within
    `tolerance`."""
    n = cost.shape[0]
    if cost.shape != (n, n):
        raise ValueError(f"a square cost matrix, not {cost.shape}")
    _, u, v = _hungarian(cost)
    allowed = cost - u[:, None] - v[None, :] <= tolerance  # the optimum's edges, and ties
    out, free = [], list(range(n))
    for row in range(n):
        col = next(c for c in free if allowed[row, c]
                   and _completes(allowed, list(range(row + 1, n)), [f for f in free if f != c]))  # fmt: skip
        out.append(col)
        free.remove(col)
    return np.array(out, dtype=np.int64)


def cosine_distances(x: np.ndarray) -> np.ndarray:
    """scikit-learn's `cosine_distances(x)`: `1 − cos` clipped to [0, 2], 0 on the diagonal."""
    unit = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), np.finfo(np.float64).tiny)
    out = np.clip(1.0 - unit @ unit.T, 0.0, 2.0)
    np.fill_diagonal(out, 0.0)
    return out


def ward_clusters(distances: np.ndarray, threshold: float) -> np.ndarray:
    """Flat clusters `[n]` (0 …) of scipy's `fcluster(linkage(d, 'ward'), threshold,
    'distance')` on a distance matrix: Ward's Lance–Williams update on the given distances,
    merging the closest pair while its distance is at most `threshold` (Ward's merge
    distances only grow, so that is the cut)."""
    n = distances.shape[0]
    d = distances.astype(np.float64, copy=True)
    np.fill_diagonal(d, np.inf)
    size = np.ones(n)
    label = np.arange(n)
    active = np.ones(n, dtype=bool)
    for _ in range(n - 1):
        masked = np.where(active[:, None] & active[None, :], d, np.inf)
        i, j = np.unravel_index(int(np.argmin(masked)), masked.shape)
        height = masked[i, j]
        if not height <= threshold:
            break
        merged = np.sqrt(np.maximum(
            ((size[i] + size) * d[i] ** 2 + (size[j] + size) * d[j] ** 2 - size * height**2)
            / (size[i] + size[j] + size), 0.0))  # fmt: skip
        d[i], d[:, i] = merged, merged
        d[i, i] = np.inf
        size[i] += size[j]
        active[j] = False
        label[label == j] = i
    return np.unique(label, return_inverse=True)[1]


# -- spectral object-level context --------------------------------------------------------


def graph_eigen(keys: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The eigenvalues (descending) `[..., r]` and unit eigenvectors `[..., N, r]` of the
    patch graphs `G = k kᵀ · scale` of keys `[..., N, d]`, r = min(N, d), the graph's other
    eigenvalues being 0: from the d × d matrix `kᵀ k` (`kᵀ k w = μ w` gives `G (k w) =
    scale · μ (k w)`), which is smaller than the N × N graph."""
    mu, w = torch.linalg.eigh(keys.transpose(-2, -1) @ keys)  # ascending [..., d]
    r = min(keys.shape[-2], keys.shape[-1])
    mu, w = mu.flip(-1)[..., :r].clamp_min(0), w.flip(-1)[..., :r]
    vectors = (keys @ w) / mu.sqrt().clamp_min(torch.finfo(mu.dtype).tiny)[..., None, :]
    return mu * scale, vectors


def spectra(values: torch.Tensor, patches: int, count: int) -> torch.Tensor:
    """The `count` largest eigenvalues `[..., count]` of graphs of `patches` nodes from their
    nonzero ones (descending, `graph_eigen`), zeros after them, L2-normalised
    (`compute_spectrum`, then `F.normalize`)."""
    count = min(count, patches)
    values = F.pad(values, (0, max(count - values.shape[-1], 0)))[..., :count]
    return F.normalize(values, p=2, dim=-1)


def spectral_distances(proxy: torch.Tensor, clip: torch.Tensor) -> torch.Tensor:
    """`[H, H]`: entry (i, j) the 1-D Wasserstein distance between proxy head i's and CLIP
    head j's spectra `[H, k]`, each scaled to sum 1 (sum of |sorted differences|)."""
    p = F.normalize(proxy, p=1, dim=-1).sort(dim=-1).values
    c = F.normalize(clip, p=1, dim=-1).sort(dim=-1).values
    return (p[:, None] - c[None]).abs().sum(dim=-1)


def low_rank(values: torch.Tensor, vectors: torch.Tensor, rank: int, stretch: bool) -> torch.Tensor:
    """Rank-`rank` approximations `U diag(s) Vᵀ` `[..., N, N]`, with a zero diagonal, of
    positive semidefinite graphs from their largest eigenvalues `[..., r]` (descending) and
    eigenvectors `[..., N, r]`: for such a graph the singular triplets are `(λ, u, u)`.

    The reference asks `torch.svd_lowrank` for q = 10 triplets and keeps the smallest q whose
    singular values hold 95 % of the energy *of those q*, which the 10th always does: every
    graph gets the (randomised) rank 10; here the exact truncated SVD. stretch: the values
    rescaled linearly from [min, max] to [min / 2, 1.5 · max] (`_scale_singular_values`; the
    reference skips it on VOC20 and Cityscapes)."""
    s, u = values[..., :rank], vectors[..., :rank]
    if stretch:
        low, high = s.amin(dim=-1, keepdim=True), s.amax(dim=-1, keepdim=True)
        span = (high - low).clamp_min(torch.finfo(s.dtype).tiny)
        s = (s - low) / span * (1.5 * high - 0.5 * low) + 0.5 * low
    approx = (u * s[..., None, :]) @ u.transpose(-2, -1)
    return approx * (1 - torch.eye(approx.shape[-1], dtype=approx.dtype, device=approx.device))


def range_of(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """`source` min–max rescaled onto `target`'s range (`_normalize_attention_range`), per
    graph of `[..., N, N]`."""
    dims = (-2, -1)
    s_low, s_high = source.amin(dim=dims, keepdim=True), source.amax(dim=dims, keepdim=True)
    t_low, t_high = target.amin(dim=dims, keepdim=True), target.amax(dim=dims, keepdim=True)
    span = (s_high - s_low).clamp_min(torch.finfo(source.dtype).tiny)
    return (source - s_low) / span * (t_high - t_low) + t_low


def spectral_context(
    clip_keys: torch.Tensor,
    proxy_keys: torch.Tensor,
    scale: float,
    stretch: bool = True,
    rank: int = RANK,
    eigenvalues: int = EIGENVALUES,
    proxy_weight: float = PROXY_WEIGHT,
) -> torch.Tensor:
    """CASS's attention logits `[H, N, N]` of one image's last block (before NACLIP's prior
    and the softmax), from the patch keys per head of CLIP `[H, N, d]` and of the proxy
    `[H, N, d′]` (`key_groups`), in float64.

    Graphs `G = k kᵀ · scale` per head. Cost (i, j) = 1 − W(proxy i, CLIP j)
    (`spectral_distances`) is minimised by an assignment σ (i → σ(i)). As the reference
    indexes the pair (its `dino_attn_weights[j]`, `attn_weights[i]`), CLIP head i is mixed
    with proxy head σ(i), with weight `w = W(proxy i, CLIP σ(i))`:
    `(w · proxy_weight · R(low_rank(G_proxy σ(i))) + G_clip i) / (w · proxy_weight + 1)`,
    R: rescaled onto `G_clip i`'s range.
    """
    clip_keys, proxy_keys = clip_keys.double(), proxy_keys.double()
    patches = clip_keys.shape[-2]
    clip_graph = (clip_keys @ clip_keys.transpose(-2, -1)) * scale
    clip_values, _ = graph_eigen(clip_keys, scale)
    values, vectors = graph_eigen(proxy_keys, scale)
    distance = spectral_distances(
        spectra(values, patches, eigenvalues), spectra(clip_values, patches, eigenvalues)
    )
    sigma = torch.from_numpy(min_cost_assignment((1 - distance).cpu().numpy()))
    sigma = sigma.to(clip_graph.device)
    weight = distance[torch.arange(len(sigma), device=sigma.device), sigma] * proxy_weight
    weight = weight[:, None, None]
    proxy_part = range_of(low_rank(values[sigma], vectors[sigma], rank, stretch), clip_graph)
    return (weight * proxy_part + clip_graph) / (weight + 1)


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
