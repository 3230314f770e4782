"""Model randomisation for the sanity check of saliency maps (Adebayo et al., 2018): a copy
of the model whose image tower is re-drawn layer by layer from the top."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch

from .base import Backend


def randomizable_copy(backend: Backend) -> tuple[Backend, list[tuple[str, list[Any]]]]:
    """A backend on a deep copy of the model (the original is never touched) and the copy's
    image-tower cascade: `(name, modules or parameters)` from the head down to the first
    block or stage. The text tower and the text caches are shared: they are not randomised."""
    twin = replace(backend, model=copy.deepcopy(backend.model), _memo={})
    return twin, twin.vision.cascade()


def redraw(parts: Sequence[Any], generator: torch.Generator) -> None:
    """Re-draw, in place, every parameter of `parts` from a normal distribution with that
    tensor's own mean and standard deviation (so activations keep their scale; a constant
    tensor, such as a fresh norm's weight, stays as it is)."""
    with torch.no_grad():
        for part in parts:
            params = [part] if isinstance(part, torch.nn.Parameter) else list(part.parameters())
            for p in params:
                values = p.detach().float()
                std = values.std() if values.numel() > 1 else values.new_zeros(())
                noise = torch.randn(p.shape, generator=generator) * std.cpu() + values.mean().cpu()
                p.copy_(noise.to(p.device, p.dtype))
