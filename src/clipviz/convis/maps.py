"""ConVis maps (Giulivi et al. 2024; docs/convis.md): ranks accumulated over
windows, the grid, stochastic and dense variants, and maps of one image for any concepts.

The reference embeds one window at a time and re-ranks per concept; here all windows of an
image go through the image tower in batches and one rank table serves every concept.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..backend import Backend
from ..errors import ClipvizError
from ..maps import normalize_maps
from .bank import ConceptBank, concept_bank
from .ranks import Discovered, discover, window_ranks
from .windows import (
    CANVAS,
    CUTOFF,
    EPSILON,
    GAMMA,
    ITERATIONS,
    PAD,
    RESTART,
    SIDE,
    WINDOW_SIZES,
    canvas_tensor,
    embed_windows,
    noise_canvas,
    square_box,
    square_image,
    window_batch,
    window_boxes,
)

VARIANTS = ("grid", "stochastic", "dense")


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
        raise ClipvizError(f"unknown `variant` {variant!r}; choose from: {', '.join(VARIANTS)}")
    if not concepts and top < 1:
        raise ClipvizError("no concepts asked for; pass `synset`, `word` or `top` K")
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
