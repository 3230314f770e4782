"""ConVis concept embeddings: `t_u` for every synset of a hierarchy, cached on disk per model
and on the backend per vocabulary."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..backend import Backend
from ..errors import ClipvizError
from ..files import atomic_path, cache_root
from .hierarchy import Hierarchy, load_hierarchy
from .nouns import noun_database

EMBED_MODES = ("definitions", "lemmas")

Progress = Callable[[int, int], None]  # (done, total)


@dataclass(frozen=True, eq=False)
class ConceptBank:
    """A hierarchy with `t_u` for every synset `u`: `embeddings` `[U, D]`, unit length."""

    hierarchy: Hierarchy
    embed: str
    embeddings: torch.Tensor  # [U, D] on the backend's device


def _check_embed(embed: str) -> None:
    if embed not in EMBED_MODES:
        raise ClipvizError(f"unknown `embed` {embed!r}; choose from: {', '.join(EMBED_MODES)}")


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
    key = ("concept-bank", vocabulary, embed, extra)

    def build() -> ConceptBank:
        hierarchy = load_hierarchy(vocabulary, extra) if extra else base
        emb = concept_embeddings(backend, hierarchy.names, embed, progress)
        return ConceptBank(hierarchy, embed, emb.to(backend.device))

    return backend.memo(key, build)
