"""ConVis's check of WordNet: AUROC of in- vs out-of-distribution images under the
hierarchy score (best leaf definition) and the single-definition score."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..backend import Backend
from ..errors import ClipvizError
from .bank import Progress, concept_embeddings
from .hierarchy import leaves
from .nouns import noun_database


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
