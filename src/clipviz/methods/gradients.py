"""The mechanism every gradient method shares (Grad-CAM, gScoreCAM, GAE, LeGrad).

Every target is a CLIP similarity `s[b, t] = cos(image_embedding_b, text_t)` (or its logit),
never a class logit. The tower runs without grad up to the earliest activation a method
reads, that activation is made to require grad, the rest of the tower builds the graph, and
`similarity_gradients` takes one backward per text, batched over the images (they are
independent, so `∂ Σ_b s[b, t]` gives every image its own gradient). Gradients are taken
with `torch.autograd.grad` on activations only: the model's weights never get `.grad` and
keep `requires_grad=False`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..backend import Texts
from ..errors import ClipvizError


def cosine(embeddings: Tensor, texts: Texts) -> Tensor:
    """`cos(image embedding, text)` `[B, T]`, in float32 (outside autocast on purpose)."""
    text = texts.embeddings.to(embeddings.device).float()
    return F.normalize(embeddings.float(), dim=-1) @ text.T


def similarity_gradients(
    similarities: Tensor, reads: Sequence[Tensor]
) -> Iterator[tuple[Tensor, ...]]:
    """Per text `t`: `∂(Σ_b s[b, t]) / ∂read` for every tensor in `reads`.

    The graph is shared by all texts, so it is kept until the last one and freed by it.
    """
    count = similarities.shape[1]
    for t in range(count):
        with torch.enable_grad():  # the caller may be under no_grad; never yield inside it
            target = similarities[:, t].sum()
        yield torch.autograd.grad(target, reads, retain_graph=t < count - 1)


def check_grad_allowed(name: str) -> None:
    if torch.is_inference_mode_enabled():
        raise ClipvizError(f"{name} needs gradients; call it outside torch.inference_mode()")


def block_index(index: int, count: int, option: str, method: str, unit: str = "blocks") -> int:
    """A block index that may count from the end (−1 = last), checked against `count`
    (`unit`: what is counted, e.g. "blocks of its last stage")."""
    if not -count <= index < count:
        raise ClipvizError(
            f"{method}: {option}={index} is out of range for a tower of {count} {unit}; "
            f"use 0…{count - 1}, or −1…−{count} to count from the last block"
        )
    return index % count


def unit(x: Tensor) -> Tensor:
    return F.normalize(x.detach().float(), dim=-1)
