"""ConVis rank tables: every synset ranked per window, subtree minima, discovery."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .bank import ConceptBank

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
