"""The method registry: name -> a function `(backend, images, texts) -> MapResult`.

Every method returns raw maps `[B, T, h, w]` (float32); normalising, upsampling and
rendering happen once, outside the methods.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

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
    from .itsm import itsm

    return {
        "itsm": Method(
            "itsm",
            itsm,
            "Image-Text Similarity Map: cosine of every projected patch token with the text",
            "Li et al., Exploring Visual Interpretability for CLIP (ECLIP), 2022",
        ),
    }


METHODS: dict[str, Method] = _registry()


def get_method(name: str) -> Method:
    """The method called `name`, or a usage error listing the choices."""
    try:
        return METHODS[name.lower()]
    except KeyError:
        raise ClipvizError(f"unknown method {name!r}; choose from: {', '.join(METHODS)}") from None
