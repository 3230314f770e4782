"""ConVis machinery (Giulivi et al. 2024; METHODS.md "ConVis"): the noise canvas, the windows,
one rank table of every synset per window, subtree minima, accumulation, and the OOD check.

The reference embeds one window at a time and re-ranks per concept; here all windows of an
image go through the image tower in batches and one rank table serves every concept.
"""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .backend import Backend
from .errors import ClipvizError
from .files import atomic_path, cache_root
from .metrics import normalize_maps
from .wordnet import Hierarchy, load_hierarchy, noun_database

SIDE = 224  # the image is centre-cropped to a square and resized to SIDE × SIDE
PAD = 128  # noise on every side: a 480 × 480 canvas
CANVAS = SIDE + 2 * PAD
WINDOW_SIZES = (128, 64)
STRIDE = 16
# the stochastic variant (the reference's defaults)
ITERATIONS, RESTART, EPSILON, GAMMA, CUTOFF = 600, 100, 0.002, 5.0, 91
EMBED_MODES = ("definitions", "lemmas")
VARIANTS = ("grid", "stochastic", "dense")

Progress = Callable[[int, int], None]  # (done, total)


# -- concept embeddings ----------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class ConceptBank:
    """A hierarchy with `t_u` for every synset `u`: `embeddings` `[U, D]`, unit length."""

    hierarchy: Hierarchy
    embed: str
    embeddings: torch.Tensor  # [U, D] on the backend's device


def _check_embed(embed: str) -> None:
    if embed not in EMBED_MODES:
        raise ClipvizError(f"unknown --embed {embed!r}; choose from: {', '.join(EMBED_MODES)}")


def concept_embeddings(
    backend: Backend,
    names: Sequence[str],
    embed: str = "definitions",
    progress: Progress | None = None,
) -> torch.Tensor:
    """`normalise(E_text(text of u))` for synsets `names` -> `[U, D]` (CPU, float32).

    Cached on disk per (model, embed mode) as one growing store of synset -> embedding, so
    any vocabulary reuses what an earlier one embedded. Texts are embedded as written (no
    prompt templates), as the paper does.
    """
    _check_embed(embed)
    db = noun_database()
    path = cache_root() / "concepts" / backend.key / f"{embed}.npz"
    stored_names: list[str] = []
    stored = np.zeros((0, 0), dtype=np.float32)
    with (
        contextlib.suppress(OSError, ValueError, KeyError),
        np.load(path, allow_pickle=False) as data,
    ):
        stored_names, stored = data["names"].tolist(), data["embeddings"]
    row = {n: i for i, n in enumerate(stored_names)}
    missing = [n for n in dict.fromkeys(names) if n not in row]
    if missing:
        texts = [db.text(db.position[n], embed) for n in missing]
        chunks: list[torch.Tensor] = []
        for i in range(0, len(texts), 256):
            # the backend's per-prompt disk cache would write one file per synset
            chunks += backend.embed_texts(texts[i : i + 256], ensemble=False)
            if progress:
                progress(min(i + 256, len(texts)), len(texts))
        new = torch.stack(chunks).numpy().astype(np.float32)
        stored = new if not stored_names else np.concatenate([stored, new])
        stored_names = stored_names + missing
        row.update({n: len(row) + k for k, n in enumerate(missing)})
        with contextlib.suppress(OSError), atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, names=np.array(stored_names), embeddings=stored)
    return torch.from_numpy(stored[[row[n] for n in names]])


_BANKS: dict[tuple[Any, ...], ConceptBank] = {}


def concept_bank(
    backend: Backend,
    vocabulary: str = "default",
    embed: str = "definitions",
    extra: Sequence[str] = (),
    progress: Progress | None = None,
) -> ConceptBank:
    """The hierarchy of `vocabulary` (plus `extra` synsets) with its embeddings on the device."""
    _check_embed(embed)
    base = load_hierarchy(vocabulary)
    extra = tuple(sorted({e for e in extra if e not in base.position}))
    key = (id(backend), backend.key, vocabulary, embed, extra)
    if key not in _BANKS:
        hierarchy = load_hierarchy(vocabulary, extra) if extra else base
        emb = concept_embeddings(backend, hierarchy.names, embed, progress)
        while len(_BANKS) >= 4:  # each holds [U, D] on the device
            _BANKS.pop(next(iter(_BANKS)))
        _BANKS[key] = ConceptBank(hierarchy, embed, emb.to(backend.device))
    return _BANKS[key]


# -- the canvas and the windows --------------------------------------------------------------


def square_box(size: tuple[int, int]) -> tuple[int, int, int, int]:
    """The centred square `(left, top, right, bottom)` of an image of `size` (width, height),
    rounded as the reference does."""
    w, h = size
    cx, cy = max(w - h, 0), max(h - w, 0)
    return cx // 2, cy // 2, w - (cx + 1) // 2, h - (cy + 1) // 2


def square_image(image: Image.Image, side: int = SIDE) -> Image.Image:
    """Centre-crop to a square and resize to `side` × `side` (bicubic): what ConVis maps cover."""
    square = image.convert("RGB").crop(square_box(image.size))
    return square.resize((side, side), Image.Resampling.BICUBIC)


def square_from_batch(backend: Backend, images: torch.Tensor, side: int = SIDE) -> np.ndarray:
    """Preprocessed model inputs `[B, 3, H, W]` -> uint8 squares `[B, side, side, 3]`.

    For methods called through `explain`, which only see the backend's tensors.
    """
    mean = torch.tensor(backend.preprocess.mean, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(backend.preprocess.std, device=images.device).view(1, 3, 1, 1)
    x = (images.float() * std + mean).clamp(0, 1)
    H, W = x.shape[-2:]
    s = min(H, W)
    x = x[..., (H - s) // 2 : (H - s) // 2 + s, (W - s) // 2 : (W - s) // 2 + s]
    x = F.interpolate(x, size=(side, side), mode="bicubic", antialias=True, align_corners=False)
    x = (x * 255).round().clamp(0, 255).to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def noise_canvas(square: np.ndarray, seed: int = 0) -> np.ndarray:
    """The square image `[224, 224, 3]` pasted in the middle of seeded uniform noise `[480, 480, 3]`."""
    canvas = np.random.default_rng(seed).integers(0, 256, (CANVAS, CANVAS, 3), dtype=np.uint8)
    canvas[PAD : PAD + SIDE, PAD : PAD + SIDE] = square
    return canvas


def window_boxes(
    canvas: int = CANVAS, sizes: Sequence[int] = WINDOW_SIZES, stride: int = STRIDE
) -> np.ndarray:
    """`[K, 4]` windows `(top, left, bottom, right)`: every size at every multiple of `stride`,
    row by row, clipped to the canvas (`(canvas / stride)²` per size: 900 for 480 px)."""
    corners = np.arange(0, canvas, stride)
    boxes = [
        (y, x, min(y + s, canvas), min(x + s, canvas))
        for s in sizes
        for y in corners
        for x in corners
    ]
    return np.array(boxes, dtype=np.int64)


def window_batch(
    canvas: torch.Tensor, boxes: np.ndarray, backend: Backend
) -> torch.Tensor:  # [k, 3, H, W]
    """The windows of `canvas` (`[3, C, C]` in [0, 1]) through the model's eval transform:
    resize the shorter side to the input size, centre-crop (open_clip's; the backend's
    `Preprocess(crop="center")`). Resizing is torch's antialiased bicubic (PIL's kernel),
    rounded to 8 bits as PIL's is, so all windows of one shape are resized at once."""
    pre = backend.preprocess
    H, W = pre.size
    dev = canvas.device
    out = torch.empty(len(boxes), 3, H, W, device=dev)
    heights, widths = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    span = torch.arange(int(max(heights.max(), widths.max())), device=dev)
    for h, w in sorted(set(zip(heights.tolist(), widths.tolist(), strict=True))):
        sel = np.flatnonzero((heights == h) & (widths == w))
        rows = torch.as_tensor(boxes[sel, 0], device=dev)[:, None] + span[:h]
        cols = torch.as_tensor(boxes[sel, 1], device=dev)[:, None] + span[:w]
        crops = canvas[:, rows[:, :, None], cols[:, None, :]].transpose(0, 1)  # [n, 3, h, w]
        scale = max(H / h, W / w)
        rh, rw = max(H, round(h * scale)), max(W, round(w * scale))
        resized = F.interpolate(crops, size=(rh, rw), mode="bicubic", antialias=True)
        top, left = (rh - H) // 2, (rw - W) // 2
        out[torch.from_numpy(sel).to(dev)] = resized[..., top : top + H, left : left + W]
    out = (out * 255).round().clamp(0, 255) / 255
    mean = torch.tensor(pre.mean, device=dev).view(1, 3, 1, 1)
    std = torch.tensor(pre.std, device=dev).view(1, 3, 1, 1)
    return (out - mean) / std


def canvas_tensor(backend: Backend, canvas: np.ndarray) -> torch.Tensor:
    """uint8 `[C, C, 3]` -> float `[3, C, C]` in [0, 1] on the backend's device."""
    return torch.from_numpy(canvas).to(backend.device).permute(2, 0, 1).float() / 255


@torch.no_grad()
def embed_windows(
    backend: Backend, canvas: np.ndarray, boxes: np.ndarray, batch_size: int = 256
) -> torch.Tensor:  # [K, D]
    """`v_W` for every window: unit image embeddings, all windows in batches."""
    if batch_size < 1:
        raise ClipvizError(f"--batch-size {batch_size} must be at least 1")
    x = canvas_tensor(backend, canvas)
    out = [
        backend.image_embeddings(window_batch(x, boxes[i : i + batch_size], backend)).float()
        for i in range(0, len(boxes), batch_size)
    ]
    return torch.cat(out)


# -- rank tables -----------------------------------------------------------------------------
# Ranks are competition ranks: `rank_u = #{v : v_W·t_v > v_W·t_u}` (0 = best; ties share the
# better rank). Then `r_W(s) = min_{u ∈ S(s)} rank_u` is simply the number of synsets that beat
# the best member of the subtree, so no full sort is needed for a concept's map.


def synset_ranks(window_emb: torch.Tensor, concept_emb: torch.Tensor) -> torch.Tensor:
    """`[k, D]`, `[U, D]` -> `[k, U]` rank of every synset per window by `v_W · t_u` (0 = best)."""
    sims = window_emb.float() @ concept_emb.float().T
    values, order = sims.sort(dim=1, descending=True)
    positions = torch.arange(sims.shape[1], device=sims.device).expand_as(order)
    new_value = torch.ones_like(order, dtype=torch.bool)
    new_value[:, 1:] = values[:, 1:] != values[:, :-1]
    first = torch.where(new_value, positions, 0).cummax(dim=1).values  # start of each tie run
    return torch.empty_like(order).scatter_(1, order, first)


def window_ranks(
    window_emb: torch.Tensor, bank: ConceptBank, concepts: Sequence[int], chunk: int = 512
) -> torch.Tensor:
    """`[K, S]`: `r_W(s)` of each window (row of `window_emb`) for the concepts (hierarchy
    indices): how many synsets score above the subtree's best."""
    dev = bank.embeddings.device
    subtrees = [torch.as_tensor(bank.hierarchy.subtree(c), device=dev) for c in concepts]
    parts = []
    for i in range(0, len(window_emb), chunk):
        sims = window_emb[i : i + chunk].to(dev).float() @ bank.embeddings.float().T  # [k, U]
        ranks = [(sims > sims[:, st].max(dim=1, keepdim=True).values).sum(dim=1) for st in subtrees]
        parts.append(torch.stack(ranks, dim=1))
    return torch.cat(parts).cpu()


@dataclass(frozen=True)
class Discovered:
    """A concept found in an image: its own best and mean rank over the windows."""

    synset: str
    best_rank: int
    mean_rank: float


def discover(
    window_emb: torch.Tensor,
    bank: ConceptBank,
    top: int,
    exclude: Sequence[int] = (),
    chunk: int = 512,
) -> list[Discovered]:
    """The `top` vocabulary synsets with the lowest best window rank (ties: lower mean rank).

    Each synset's own rank is used, not its subtree minimum, which would crown `entity.n.01`.
    """
    U = len(bank.hierarchy)
    best = torch.full((U,), U, dtype=torch.long, device=bank.embeddings.device)
    total = torch.zeros(U, dtype=torch.float64, device=bank.embeddings.device)
    for i in range(0, len(window_emb), chunk):
        ranks = synset_ranks(window_emb[i : i + chunk].to(bank.embeddings.device), bank.embeddings)
        best = torch.minimum(best, ranks.min(dim=0).values)
        total += ranks.sum(dim=0, dtype=torch.float64)
    members_np = np.setdiff1d(bank.hierarchy.members, np.asarray(exclude, dtype=np.int64))
    members = torch.from_numpy(members_np).to(best.device)
    mean = total[members] / len(window_emb)
    order = np.lexsort((mean.cpu().numpy(), best[members].cpu().numpy()))[:top]
    return [
        Discovered(bank.hierarchy.names[int(members[j])], int(best[members[j]]), float(mean[j]))
        for j in order.tolist()
    ]


# -- maps ------------------------------------------------------------------------------------


def accumulate(boxes: np.ndarray, scores: torch.Tensor, canvas: int = CANVAS) -> torch.Tensor:
    """`A[s] = Σ_W scores[W, s] · 1[pixel ∈ W]` -> `[S, canvas, canvas]` (CPU; int64 scores
    stay exact), through a 2-D difference table and two cumulative sums."""
    scores = scores.cpu()
    dtype = torch.int64 if not scores.is_floating_point() else torch.float64
    scores = scores.to(dtype)
    n = canvas + 1
    b = torch.from_numpy(boxes)
    top, left, bottom, right = b[:, 0], b[:, 1], b[:, 2], b[:, 3]
    index = torch.cat([top * n + left, top * n + right, bottom * n + left, bottom * n + right])
    values = torch.cat([scores, -scores, -scores, scores]).T  # [S, 4K]
    diff = torch.zeros(scores.shape[1], n * n, dtype=dtype)
    diff.index_add_(1, index, values)
    return diff.view(-1, n, n).cumsum(1).cumsum(2)[:, :canvas, :canvas]


def minmax(maps: torch.Tensor) -> torch.Tensor:
    """Min-max normalise each `[..., h, w]` map to [0, 1] (a flat map becomes 0)."""
    return normalize_maps(maps.double()).float()  # float64: accumulated ranks are large


def crop_padding(acc: torch.Tensor) -> torch.Tensor:
    return acc[..., PAD : PAD + SIDE, PAD : PAD + SIDE]


def rank_map(boxes: np.ndarray, ranks: torch.Tensor) -> torch.Tensor:
    """Window ranks `[K, S]` -> ConVis maps `M = 1 − norm(A)` `[S, 224, 224]` (1 = salient)."""
    return 1.0 - minmax(crop_padding(accumulate(boxes, ranks)))


def grid_maps(
    backend: Backend,
    square: np.ndarray,
    bank: ConceptBank,
    concepts: Sequence[int],
    seed: int = 0,
    batch_size: int = 256,
    top: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, list[Discovered]]:
    """The grid method on one uint8 square image: maps `[S, 224, 224]` for `concepts` plus the
    `top` discovered concepts (appended), the rank table `r_W(s)` `[1800, S]` (windows in
    `window_boxes()` order), and the discoveries."""
    boxes = window_boxes()
    emb = embed_windows(backend, noise_canvas(square, seed), boxes, batch_size)
    found = discover(emb, bank, top, exclude=concepts) if top else []
    idx = list(concepts) + [bank.hierarchy.index(d.synset) for d in found]
    ranks = window_ranks(emb, bank, idx)  # [K, S]
    return rank_map(boxes, ranks), ranks, found


def _concept_rng(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


@torch.no_grad()
def stochastic_maps(
    backend: Backend,
    square: np.ndarray,
    bank: ConceptBank,
    concepts: Sequence[int],
    seed: int = 0,
    iterations: int = ITERATIONS,
    restart: int = RESTART,
    epsilon: float = EPSILON,
    gamma: float = GAMMA,
    cutoff: int = CUTOFF,
) -> torch.Tensor:
    """The stochastic variant: per concept, windows sampled with probability proportional to
    the current map, which each window's rank scales by `1 + ε(2·exp(−γ r/R)·[r < R] − 1)`.

    As the reference: a window's top-left corner is drawn from the first 224 + 128 rows and
    columns of the accumulator; windows of 128 until the half-way restart, then 64. All
    concepts' windows of an iteration go through the model as one batch. -> `[S, 224, 224]`.
    """
    x = canvas_tensor(backend, noise_canvas(square, seed))
    S, span, size = len(concepts), SIDE + WINDOW_SIZES[0], WINDOW_SIZES[0]
    names = [bank.hierarchy.names[c] for c in concepts]
    rngs = [_concept_rng(seed, n) for n in names]
    subtrees = [
        torch.as_tensor(bank.hierarchy.subtree(c), device=bank.embeddings.device) for c in concepts
    ]
    acc = np.ones((S, CANVAS, CANVAS))
    total = np.zeros((S, CANVAS, CANVAS))
    for it in range(iterations):
        boxes = np.empty((S, 4), dtype=np.int64)
        for j in range(S):
            p = acc[j, :span, :span].ravel()
            y, xx = divmod(int(rngs[j].choice(p.size, p=p / p.sum())), span)
            boxes[j] = (y, xx, min(y + size, CANVAS), min(xx + size, CANVAS))
        emb = backend.image_embeddings(window_batch(x, boxes, backend)).float()
        sims = emb.to(bank.embeddings.device) @ bank.embeddings.float().T  # [S, U]
        rank = np.array([int((sims[j] > sims[j, st].max()).sum()) for j, st in enumerate(subtrees)])
        score = 2.0 * np.exp(-gamma * rank / cutoff) * (rank < cutoff) - 1.0
        for j, (t, left, b, right) in enumerate(boxes.tolist()):
            acc[j, t:b, left:right] *= 1.0 + epsilon * score[j]
        if it % restart == restart - 1:
            total += acc
            acc[:] = 1.0
            if it >= iterations / 2 - 1:
                size = WINDOW_SIZES[1]
    return minmax(crop_padding(torch.from_numpy(total)))


@torch.no_grad()
def dense_maps(
    backend: Backend, images: torch.Tensor, bank: ConceptBank, concepts: Sequence[int]
) -> torch.Tensor:
    """Ours, not the paper's: every patch token ranks the synsets like a window, from one
    forward pass -> raw maps `−r_patch(s)` `[B, S, h, w]` (higher = more salient)."""
    tokens = backend.dense_tokens(images)[:, 1:]  # [B, N, D]
    B, N, D = tokens.shape
    h, w = backend.grid_size(images)
    r = window_ranks(tokens.reshape(B * N, D), bank, concepts)  # [B*N, S]
    return -r.float().view(B, h, w, -1).permute(0, 3, 1, 2).cpu()


# -- the OOD check ---------------------------------------------------------------------------


def auroc(positive: np.ndarray, negative: np.ndarray) -> float:
    """Area under the ROC curve of scores (positives should score higher); ties count ½.

    The Mann–Whitney statistic with mid-ranks: `(R₊ − n₊(n₊+1)/2) / (n₊ n₋)`.
    """
    pos = np.asarray(positive, dtype=np.float64).ravel()
    neg = np.asarray(negative, dtype=np.float64).ravel()
    if not len(pos) or not len(neg):
        raise ClipvizError("AUROC needs at least one in- and one out-of-distribution score")
    scores = np.concatenate([pos, neg])
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    ranks = np.empty(len(scores))
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    ends = np.r_[starts[1:], len(scores)]
    for s, e in zip(starts, ends, strict=True):
        ranks[order[s:e]] = (s + e + 1) / 2.0  # mean of 1-based ranks s+1 .. e
    n_pos, n_neg = len(pos), len(neg)
    return float((ranks[:n_pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


@dataclass(frozen=True)
class OODResult:
    in_synset: str
    leaves: int
    auroc_hierarchy: float
    auroc_single: float
    id_scores: np.ndarray  # [N_id, 2] hierarchy, single
    ood_scores: np.ndarray  # [N_ood, 2]


def ood_scores(
    image_emb: torch.Tensor, leaf_emb: torch.Tensor, synset_emb: torch.Tensor
) -> np.ndarray:
    """`[N, 2]`: the hierarchy score (max cosine with the subtree's leaves) and the
    single-definition score (cosine with the synset itself)."""
    v = F.normalize(image_emb.float().cpu(), dim=-1)
    hierarchy = (v @ leaf_emb.float().cpu().T).max(dim=1).values
    single = v @ synset_emb.float().cpu()
    return torch.stack([hierarchy, single], dim=1).numpy()


def ood_check(
    backend: Backend,
    in_synset: str,
    id_emb: torch.Tensor,
    ood_emb: torch.Tensor,
    embed: str = "definitions",
    progress: Progress | None = None,
) -> OODResult:
    """AUROC of in- vs out-of-distribution image embeddings under both zero-shot scores."""
    from .wordnet import leaves

    db = noun_database()
    name = db.names[db.synset(in_synset)]
    leaf_names = leaves(name)
    emb = concept_embeddings(backend, [name, *leaf_names], embed, progress)
    ids, oods = ood_scores(id_emb, emb[1:], emb[0]), ood_scores(ood_emb, emb[1:], emb[0])
    return OODResult(
        name,
        len(leaf_names),
        auroc(ids[:, 0], oods[:, 0]),
        auroc(ids[:, 1], oods[:, 1]),
        ids,
        oods,
    )


# -- one image, any concepts -----------------------------------------------------------------


@dataclass(frozen=True)
class ConceptMaps:
    """ConVis maps of one image; they cover `square` (the centre-cropped, resized image).

    maps: `[S, h, w]` — grid/stochastic: `M` in [0, 1] at 224 × 224; dense: `−rank` per patch.
    best_ranks: per concept, its lowest `r_W(s)` over the windows (patches for dense); None
    for the stochastic variant, which ranks only the windows it samples.
    """

    concepts: list[str]
    maps: torch.Tensor
    best_ranks: list[int | None]
    discovered: list[Discovered]
    square: np.ndarray  # uint8 [224, 224, 3]


def concept_maps(
    backend: Backend,
    image: Image.Image,
    concepts: Sequence[str] = (),
    variant: str = "grid",
    vocabulary: str = "default",
    embed: str = "definitions",
    seed: int = 0,
    top: int = 0,
    batch_size: int = 256,
    bank: ConceptBank | None = None,
) -> ConceptMaps:
    """ConVis maps of `image` for synsets `concepts` and/or the `top` discovered concepts."""
    if variant not in VARIANTS:
        raise ClipvizError(f"unknown --variant {variant!r}; choose from: {', '.join(VARIANTS)}")
    if not concepts and top < 1:
        raise ClipvizError("no concepts asked for; pass --synset, --word or --top K")
    bank = bank or concept_bank(backend, vocabulary, embed, extra=concepts)
    idx = [bank.hierarchy.index(c) for c in concepts]
    square = np.asarray(square_image(image))
    best: list[int | None]
    if variant == "dense":
        x = backend.preprocess(Image.fromarray(square))[None].to(backend.device)
        tokens = backend.dense_tokens(x)[0, 1:]
        found = discover(tokens, bank, top, exclude=idx) if top else []
        idx += [bank.hierarchy.index(d.synset) for d in found]
        maps = dense_maps(backend, x, bank, idx)[0]
        best = [int(-v) for v in maps.flatten(1).max(dim=1).values.tolist()]
    elif variant == "grid":
        maps, ranks, found = grid_maps(backend, square, bank, idx, seed, batch_size, top)
        idx += [bank.hierarchy.index(d.synset) for d in found]
        best = [int(v) for v in ranks.min(dim=0).values.tolist()]
    else:
        found = []
        if top:
            emb = embed_windows(backend, noise_canvas(square, seed), window_boxes(), batch_size)
            found = discover(emb, bank, top, exclude=idx)
        idx += [bank.hierarchy.index(d.synset) for d in found]
        maps = stochastic_maps(backend, square, bank, idx, seed)
        best = [None] * len(idx)
    names = [bank.hierarchy.names[i] for i in idx]
    return ConceptMaps(names, maps, best, found, square)


def concept_map(backend: Backend, image: Image.Image, synset: str, **options: Any) -> np.ndarray:
    """One concept's map `[224, 224]` in [0, 1] over `square_image(image)` (see `square_mask`).

    E.g. `concept_map(model, img, "circle.n.01", embed="lemmas")`; options as `concept_maps`.
    """
    result = concept_maps(backend, image, [synset], **options)
    m = minmax(result.maps[:1])[None]
    return F.interpolate(m, size=(SIDE, SIDE), mode="bilinear", align_corners=False)[0, 0].numpy()


def square_mask(mask: np.ndarray) -> np.ndarray:
    """A boolean mask `[H, W]` of an image -> `[224, 224]` aligned with `square_image`."""
    img = Image.fromarray(np.asarray(mask, dtype=np.uint8) * 255)
    square = img.crop(square_box(img.size)).resize((SIDE, SIDE), Image.Resampling.NEAREST)
    return np.asarray(square) > 127
