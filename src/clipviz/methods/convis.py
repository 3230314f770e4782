"""ConVis — concept maps from WordNet (Giulivi et al. 2024); machinery in `clipviz.convis`.

Each text names a concept: the `synsets` option (one synset per text, or one for all), else
the prompt itself when it is a synset name (`dog.n.01`), else the prompt's most frequent noun
sense (a leading article dropped: "a dog" is dog). docs/convis.md says what the maps show and
how to run them.
Grid and stochastic maps are `[B, T, 224, 224]` over the input, which `explain` hands over
already resized by the backend (`--crop center` gives the paper's centre crop); `dense`
(ours) is `[B, T, h, w]` from one forward pass.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Literal

import torch

from ..backend import Backend, Texts
from ..backend.towers import MAP, RESNET, TOKENS
from ..convis.bank import concept_bank
from ..convis.hierarchy import resolve_concepts
from ..convis.maps import VARIANTS, dense_maps, grid_maps, stochastic_maps
from ..convis.windows import square_from_batch
from ..errors import ClipvizError
from .registry import MapResult, register

_SYNSET = re.compile(r"^.+\.n\.\d+$")
_ARTICLE = re.compile(r"^(a|an|the)\s+", re.IGNORECASE)


def text_concepts(prompts: Sequence[str], synsets: str | Sequence[str] | None = None) -> list[str]:
    """The synset each prompt stands for (see the module docstring)."""
    if synsets is not None:
        names = synsets.split(",") if isinstance(synsets, str) else list(synsets)
        if len(names) == 1:
            names = names * len(prompts)  # one concept for every class (the WSOL setting)
        if len(names) != len(prompts):
            raise ClipvizError(
                f"convis: {len(names)} synsets for {len(prompts)} texts; give one per text, "
                "or one for all"
            )
        return [resolve_concepts(synsets=[n.strip()])[0][0] for n in names]
    out = []
    for p in prompts:
        if _SYNSET.match(p.strip()):
            found, _ = resolve_concepts(synsets=[p])
        else:  # "a dog" names the noun dog
            found, _ = resolve_concepts(words=[_ARTICLE.sub("", p.strip())])
        out.append(found[0])
    return out


@register(
    "convis",
    towers=(TOKENS, RESNET, MAP),
    ranges={"seed": "[0, 4294967295]", "window_batch": "[1, 4096]"},
    summary="ConVis: maps of WordNet concepts from the ranks of every synset's definition over "
    "1,800 windows (a text = a synset: the synsets option, a 'dog.n.01' prompt, or a noun)",
    citation="Giulivi & Boracchi, Concept Visualization: Explaining the CLIP Multi-modal "
    "Embedding Using WordNet, IJCNN 2024",
    reference="the paper's grid and stochastic window procedures, as described (docs/convis.md); "
    "the docstrings of clipviz.convis list where clipviz departs",
    defaults="the grid variant: 1,800 windows of 128 and 64 px at stride 16 on seeded noise padding,"
    " synsets embedded by their definitions, the default 2,066-word vocabulary (a prompt "
    "names a concept: `dog.n.01`, or a noun)",
)
def convis(
    backend: Backend,
    images: torch.Tensor,
    texts: Texts,
    synsets: Sequence[str] | None = None,
    variant: Literal["grid", "stochastic", "dense"] = "grid",
    vocabulary: str = "default",
    embed: Literal["definitions", "lemmas"] = "definitions",
    seed: int = 0,
    window_batch: int = 256,
) -> MapResult:
    """ConVis maps of the concept each text stands for.

    synsets: the WordNet synset of each text, in order (one synset: the same for every text).
    variant: grid (the paper's 1,800 windows), stochastic (the paper's sampled windows) or
        dense (ours: ranks per patch token from one forward pass).
    vocabulary: default (2,066 common physical-object nouns), all (every noun synset) or a file
        of words or synsets.
    embed: embed each synset's definition or its lemma names.
    seed: seed of the noise padding.
    window_batch: windows per forward pass.
    """
    if variant not in VARIANTS:
        raise ClipvizError(
            f"unknown convis variant {variant!r}; choose from: {', '.join(VARIANTS)}"
        )
    names = text_concepts(texts.prompts, synsets)
    bank = concept_bank(backend, vocabulary, embed, extra=names)
    idx = [bank.hierarchy.index(n) for n in names]
    if variant == "dense":
        return MapResult(dense_maps(backend, images, bank, idx))
    maps = []
    for square in square_from_batch(backend, images):
        if variant == "grid":
            maps.append(grid_maps(backend, square, bank, idx, seed, window_batch)[0])
        else:
            maps.append(stochastic_maps(backend, square, bank, idx, seed))
    return MapResult(torch.stack(maps))
