"""CASS's graph routines: the spectral matching of CLIP's and the proxy's patch graphs per
head (`spectral_context`, the attention logits of CASS's last block), and the scipy and
scikit-learn routines CASS needs written out in numpy (a least-cost assignment, Ward
clustering, cosine distances). Pure tensor and array math; `cass.py` is the method.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

# custom_attn's config: the eigenvalues compared per head ('k_eigen'), the proxy graph's
# weight ('scale_factor'); optimal_q's first rank (see `low_rank`)
EIGENVALUES = 20
PROXY_WEIGHT = 10.0
RANK = 10


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
