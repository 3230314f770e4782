"""The library entry point: `explain(backend, images, prompts)` -> `Explanation`."""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .backend import Backend, Texts
from .display import Shown
from .errors import ClipvizError
from .maps import place_in_box, upsample_normalized
from .methods import check_methods, get_method
from .render import blend_heatmap


@dataclass(frozen=True)
class Explanation:
    """Maps and scores of one method for a batch of images and a set of prompts.

    maps: raw method output `[B, T, h, w]` (float32, not normalised).
    scores: `cos(image embedding, text)` `[B, T]`.
    probs: the model's probabilities `[B, T]`: a softmax of `logit_scale * scores` over the
        prompts, or for SigLIP-style models `sigmoid(logit_scale * scores + logit_bias)`.
    extras: what else the method explains, per image (first axis B): Grad-ECLIP's
        `text_importance` `[B, T, n]`, TextSpan's `head_maps` `[B, T, heads, h, w]`.
    labels: names along an extra's last axis, shared by the batch (`text_tokens` `[T, n]`,
        `heads`).
    """

    method: str
    prompts: list[str]
    maps: torch.Tensor
    scores: torch.Tensor
    probs: torch.Tensor
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    labels: dict[str, list[list[str]]] = field(default_factory=dict)
    # the images explained, for display (converted only when shown)
    shown: Shown | None = field(default=None, repr=False, compare=False)

    def upsampled(self, index: int, size: tuple[int, int]) -> torch.Tensor:
        """Maps of image `index`, min-max normalised per prompt, bilinear to `size` (H, W)."""
        return upsample_normalized(self.maps[index], size)

    def image(self, index: int = 0) -> Image.Image:
        """Image `index` as explained (a preprocessed batch is shown at the model's size)."""
        if self.shown is None:
            raise ClipvizError("this explanation holds no images to show (it was built by hand)")
        return self.shown.image(index)

    def overlay(
        self, index: int = 0, prompt: int | str = 0, colormap: str = "jet", alpha: float = 0.5
    ) -> Image.Image:
        """The map of image `index` for `prompt` (its position or its text) over the image, as
        the run's overlay PNG shows it (no data outside the part the model saw)."""
        t = self.prompts.index(prompt) if isinstance(prompt, str) else prompt
        image = self.image(index)
        box = self.shown.box(index) if self.shown is not None else (0, 0, *image.size)
        norm = place_in_box(self.maps[index, t : t + 1], box, (image.height, image.width))
        return Image.fromarray(blend_heatmap(np.asarray(image), norm[0].numpy(), colormap, alpha))

    def show(self, index: int = 0, colormap: str = "jet", alpha: float = 0.5) -> Any:
        """A matplotlib figure of image `index` and each prompt's overlay, with the prompt,
        the method, the model's probability and a colorbar."""
        from .display import figure

        return figure(self, index, colormap=colormap, alpha=alpha)

    def _repr_png_(self) -> bytes:
        from .display import figure_png

        return figure_png(self, 0)


def _blank(prompt: str) -> bool:
    """True for a prompt with no text: empty, or only spaces and control or format characters
    (such as escape codes or zero-width spaces)."""
    return all(c.isspace() or unicodedata.category(c) in ("Cc", "Cf") for c in prompt)


def check_prompt_text(prompts: Sequence[str], hint: str = "") -> None:
    """Refuse blank prompts and any holding a NUL byte (a binary or corrupt file read as
    prompts), in one line. hint: added to the blank prompts' message, e.g. where to look."""
    if nul := [p for p in prompts if "\0" in p]:
        shown = nul[0].replace("\0", "\\0")[:40]
        raise ClipvizError(
            f"prompt {shown!r} holds a NUL byte: not text (is the prompts file a binary or "
            "corrupt file?); pass prompts as plain text"
        )
    if blank := [p for p in prompts if _blank(p)]:
        raise ClipvizError(
            f"{len(blank)} blank prompt(s) given (empty, or only spaces or control "
            f"characters); every prompt needs some text{hint}"
        )


def to_batch(backend: Backend, images: torch.Tensor | Sequence[Image.Image]) -> torch.Tensor:
    if isinstance(images, torch.Tensor):
        return images[None] if images.dim() == 3 else images
    return torch.stack([backend.preprocess(im) for im in images])


def explain(
    backend: Backend,
    images: torch.Tensor | Sequence[Image.Image],
    prompts: Sequence[str] | Texts,
    method: str = "itsm",
    ensemble: bool = True,
    options: dict[str, Any] | None = None,
) -> Explanation:
    """Explain why `backend`'s CLIP matches each image with each prompt.

    images: PIL images (preprocessed with the backend's transform) or a preprocessed batch
        `[B, 3, H, W]`.
    prompts: strings (embedded through the template ensemble unless `ensemble=False`) or
        ready `Texts`.
    options: the method's options (e.g. `{"depth": 6}` for surgery); an unknown or ill-typed
        option is a `ClipvizError` that lists the method's options.
    """
    spec = get_method(method)
    bound = spec.info.bind(options)
    check_methods(backend, [spec.name])
    if isinstance(prompts, Texts):
        texts = prompts
    else:
        prompts = [str(p) for p in prompts]
        if not prompts:
            raise ClipvizError("no prompts given; pass at least one text to explain")
        check_prompt_text(prompts)
        texts = backend.encode_texts(prompts, ensemble=ensemble)
    batch = to_batch(backend, images).to(backend.device, non_blocking=True)
    result = spec.fn(backend, batch, texts, **bound)
    image_emb = result.image_embeddings
    if image_emb is None:
        image_emb = backend.image_embeddings(batch)
    scores = F.normalize(image_emb.float(), dim=-1) @ texts.embeddings.float().T  # [B, T]
    probs = backend.probabilities(scores)
    return Explanation(
        method=spec.name,
        prompts=list(texts.prompts),
        maps=result.maps.float().cpu(),
        scores=scores.cpu(),
        probs=probs.cpu(),
        extras={k: v.detach().float().cpu() for k, v in result.extras.items()},
        labels=result.labels,
        shown=Shown(backend.preprocess, images),
    )
