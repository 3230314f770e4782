"""`clipviz heads`: TextSpan's description of the attention heads of the last blocks by
texts, from their direct contributions over a set of images.

The text bank is a file of descriptions (one per line, embedded as written, as the
reference does) or WordNet concepts: the ConVis vocabulary's synsets, embedded by their
definitions and cached with the concept bank of `clipviz concepts`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..backend import Backend
from ..data.images import ImageError, load_image
from ..data.inputs import InputItem
from ..errors import ClipvizError
from ..files import provenance, write_json_atomic
from ..methods import check_methods
from ..methods.textspan import head_embeddings, read_heads, text_span

Progress = Callable[[int, int], None]  # (done, total)


@dataclass(frozen=True)
class TextBank:
    """Unit text embeddings `[U, D]` and what each row says."""

    texts: list[str]
    embeddings: torch.Tensor


@dataclass(frozen=True)
class HeadDescription:
    head: str  # "L<block>.H<head>"
    texts: list[str]
    explained: float  # share of the head's variance over the images the texts explain


def file_bank(backend: Backend, path: Path) -> TextBank:
    """One description per non-empty line of `path`, embedded as written (no templates)."""
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as e:
        raise ClipvizError(f"cannot read the text bank {path}: {e}") from None
    texts = list(dict.fromkeys(t for t in lines if t))
    if len(texts) < 2:
        raise ClipvizError(f"the text bank {path} needs at least 2 lines of text")
    return TextBank(texts, torch.stack(backend.embed_texts(texts, ensemble=False)))


def concept_text_bank(
    backend: Backend, vocabulary: str = "default", progress: Progress | None = None
) -> TextBank:
    """The synsets of a ConVis vocabulary's hierarchy, as "lemma (synset)" by definition."""
    from ..convis.bank import concept_bank
    from ..convis.nouns import noun_database

    bank = concept_bank(backend, vocabulary, "definitions", progress=progress)
    db = noun_database()
    names = [
        f"{db.lemmas[db.position[n]][0].replace('_', ' ')} ({n})" for n in bank.hierarchy.names
    ]
    return TextBank(names, bank.embeddings.float().cpu())


def collect_head_embeddings(
    backend: Backend, items: Sequence[InputItem], layers: int, batch_size: int,
    progress: Progress | None = None,
) -> tuple[torch.Tensor, list[str], list[tuple[str, str]]]:  # fmt: skip
    """Each head's direct contribution `[N, heads, D]` (CPU) over the readable items, the
    heads' names, and (input, error) of the items that could not be read."""
    if batch_size < 1:
        raise ClipvizError(f"`batch_size` {batch_size} must be at least 1")
    check_methods(backend, ["textspan"])
    chunks: list[torch.Tensor] = []
    failed: list[tuple[str, str]] = []
    names: list[str] = []
    batch: list[torch.Tensor] = []

    def flush() -> None:
        nonlocal names
        x = torch.stack(batch).to(backend.device)
        reads = read_heads(backend, x, layers)
        chunks.append(head_embeddings(backend, reads).cpu())
        names = [f"L{i}.H{j}" for i in reads.blocks for j in range(reads.heads)]
        batch.clear()

    for n, item in enumerate(items, 1):
        try:
            batch.append(backend.preprocess(load_image(item.path)))
        except ImageError as e:
            failed.append((item.key, str(e)))
        if len(batch) == batch_size:
            flush()
        if progress:
            progress(n, len(items))
    if batch:
        flush()
    if not chunks:
        raise ClipvizError("none of the images could be read", exit_code=1)
    return torch.cat(chunks), names, failed


def describe_heads(
    data: torch.Tensor, names: Sequence[str], bank: TextBank, count: int = 10, rank: int = 80
) -> list[HeadDescription]:
    """TextSpan per head of `data` `[N, heads, D]` with the texts of `bank`."""
    if count < 1 or rank < 1:
        raise ClipvizError(f"`count` ({count}) and `rank` ({rank}) must be at least 1")
    out = []
    for h, name in enumerate(names):
        chosen, explained = text_span(data[:, h], bank.embeddings, count, rank)
        out.append(HeadDescription(name, [bank.texts[i] for i in chosen], round(explained, 4)))
    return out


def write_heads(
    path: Path,
    backend: Backend,
    described: Sequence[HeadDescription],
    info: dict[str, Any],
) -> None:
    """`heads.json`: provenance, the run's settings and every head's description."""
    write_json_atomic(
        path,
        {
            **provenance(),
            "model": backend.identity,
            **info,
            "heads": [asdict(d) for d in described],
        },
    )
