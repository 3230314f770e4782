"""The method registry: name -> a function `(backend, images, texts) -> MapResult`.

Every method returns raw maps `[B, T, h, w]` (float32); normalising, upsampling and
rendering happen once, outside the methods.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import ClipvizError


@dataclass(frozen=True)
class MapResult:
    """Raw maps `[B, T, h, w]`, plus the global image embeddings `[B, D]` when the method
    computed them on the way (so the caller need not run the model again for scores)."""

    maps: torch.Tensor
    image_embeddings: torch.Tensor | None = None


MethodFn = Callable[..., MapResult]  # (backend, images [B,3,H,W], texts, **options)


@dataclass(frozen=True)
class Method:
    name: str
    fn: MethodFn
    summary: str
    citation: str
    towers: tuple[str, ...] = ("vit", "rn")
    options: tuple[str, ...] = ()  # keyword options the function accepts (paper knobs)


def _registry() -> dict[str, Method]:
    from .baseline import attention_map, random_map
    from .convis import convis
    from .eclip import eclip
    from .gradients import GRADIENT_METHODS
    from .itsm import itsm
    from .surgery import SURGERY_METHODS

    methods = [
        Method(
            "itsm",
            itsm,
            "Image-Text Similarity Map: cosine of every projected patch token with the text",
            "Li et al., Exploring Visual Interpretability for CLIP (ECLIP), arXiv:2209.07046, 2022",
        ),
        Method(
            "eclip",
            eclip,
            "ITSM on the explain projection trained by `clipviz train` (masked max pooling)",
            "Li et al., Exploring Visual Interpretability for CLIP (ECLIP), arXiv:2209.07046, 2022"
            " — our implementation",
            options=("eclip",),
        ),
        *SURGERY_METHODS,
        *GRADIENT_METHODS.values(),
        Method(
            "convis",
            convis,
            "ConVis: maps of WordNet concepts from the ranks of every synset's definition over "
            "1,800 windows (a text = a synset: --synset, a 'dog.n.01' prompt, or a noun)",
            "Giulivi & Boracchi, Concept Visualization: Explaining the CLIP Multi-modal "
            "Embedding Using WordNet, IJCNN 2024",
            options=("synsets", "variant", "vocabulary", "embed", "seed", "window_batch"),
        ),
        Method(
            "attention",
            attention_map,
            "The class token's attention over the patches in the last block (text-agnostic)",
            "the free attention of Li et al. (ECLIP), 2022",
        ),
        Method(
            "random",
            random_map,
            "Baseline: uniform random maps (chance level for every metric)",
            "—",
            options=("seed",),
        ),
    ]
    return {m.name: m for m in methods}


METHODS: dict[str, Method] = _registry()


def get_method(name: str) -> Method:
    """The method called `name`, or a usage error listing the choices."""
    try:
        return METHODS[name.lower()]
    except KeyError:
        raise ClipvizError(f"unknown method {name!r}; choose from: {', '.join(METHODS)}") from None


def check_methods(backend: Any, names: Sequence[str]) -> None:
    """Refuse, before any work, a method that is unknown or does not fit the model's tower."""
    for name in names:
        spec = get_method(name)
        if backend.tower not in spec.towers:
            other = "ViT" if backend.tower == "rn" else "ResNet"
            raise ClipvizError(
                f"method {spec.name} is defined for {other} towers only, and "
                f"{backend.identity['model']} has a {'ViT' if backend.tower == 'vit' else 'ResNet'} "
                "tower; choose another --method or --model"
            )
