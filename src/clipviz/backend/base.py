"""A loaded CLIP model as the methods see it.

Preprocesses images, embeds texts (prompt ensembles, cached in memory and on disk) and
gives the image tower through its family's adapter (`vision`). Nothing here renders or
writes user outputs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Literal, TypeVar, cast

import torch
import torch.nn.functional as F

from ..errors import ClipvizError
from .preprocess import Preprocess
from .text import TextCache, Texts, ensemble_templates
from .text_tower import TextTower
from .towers import (
    MAP,
    RESNET,
    TOKENS,
    ConvMapTower,
    LinearHeadTower,
    ReadoutTower,
    ResNetPoolTower,
    TokenTower,
    Tower,
    tower_adapter,
)

Precision = Literal["auto", "fp32", "bf16", "fp16"]
T = TypeVar("T")


@dataclass(eq=False)
class Backend:
    """A loaded CLIP model on a device, with everything methods need to read from it."""

    model: Any  # open_clip.CLIP / CustomTextCLIP
    tokenizer: Any
    device: torch.device
    preprocess: Preprocess
    identity: dict[str, Any]
    autocast_dtype: torch.dtype | None = None
    # what `speed.accelerate` did to the image tower: channels_last, compiled_units
    speed: dict[str, Any] = field(default_factory=dict)
    text_cache: TextCache = field(default_factory=lambda: TextCache(None))
    _memo: dict[Hashable, Any] = field(default_factory=dict, repr=False)

    # -- model facts -------------------------------------------------------------------------

    @cached_property
    def vision(self) -> Tower:
        """The image tower's adapter (one per family: `ViTTower`, `TimmStageTower`, …; see
        `towers.py` for what each kind offers)."""
        return tower_adapter(self.model.visual, self.memo, str(self.identity.get("model")))

    @cached_property
    def text_tower(self) -> TextTower:
        """The text transformer's adapter (a usage error for towers it cannot read)."""
        return TextTower(self.model, self.tokenizer, str(self.identity.get("model")))

    @property
    def tower(self) -> Literal["tokens", "rn", "conv"]:
        """The image tower's kind: `tokens` (token stream and blocks), `rn` (ResNet with an
        attention pool) or `conv` (a pooled feature map)."""
        return self.vision.kind  # type: ignore[return-value]

    @property
    def family(self) -> str:
        """The tower's family in words, e.g. "timm Eva, map head"."""
        return self.vision.family

    @property
    def vit(self) -> TokenTower:
        """The token-stream adapter (a usage error for other towers)."""
        if self.vision.kind != TOKENS:
            raise ClipvizError(self._tower_message("a ViT"))
        return cast(TokenTower, self.vision)

    @property
    def readout_vit(self) -> ReadoutTower:
        """The token-stream adapter of a tower whose patches a class token or a probe reads
        (a usage error for others)."""
        if self.vision.kind != TOKENS or "readout" not in self.vision.capabilities:
            raise ClipvizError(self._tower_message("a ViT with a class token or a probe"))
        return cast(ReadoutTower, self.vision)

    @property
    def linear_head_vit(self) -> LinearHeadTower:
        """The token-stream adapter of a tower whose embedding is `post_norm(class token) @
        proj`, split by head (a usage error for others)."""
        if self.vision.kind != TOKENS or "linear_head" not in self.vision.capabilities:
            raise ClipvizError(
                self._tower_message("a ViT whose head is ln_post(class token) @ proj")
            )
        return cast(LinearHeadTower, self.vision)

    @property
    def conv(self) -> ConvMapTower:
        """The adapter of a tower that pools a feature map (a usage error for others)."""
        if self.vision.kind != MAP:
            raise ClipvizError(self._tower_message("a convolutional"))
        return cast(ConvMapTower, self.vision)

    @property
    def rn(self) -> ResNetPoolTower:
        """The ModifiedResNet adapter (a usage error for other towers)."""
        if self.vision.kind != RESNET:
            raise ClipvizError(self._tower_message("a ResNet"))
        return cast(ResNetPoolTower, self.vision)

    def _tower_message(self, needed: str) -> str:
        return (
            f"this needs {needed} image tower, and {self.identity.get('model')}'s image tower "
            f"is {self.family}; `clipviz methods` lists the methods for each tower"
        )

    @property
    def input_size(self) -> tuple[int, int]:
        return self.preprocess.size

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.exp().item())

    @property
    def logit_bias(self) -> float | None:
        """SigLIP-style models' bias: their scores are `sigmoid(scale · cos + bias)`."""
        bias = getattr(self.model, "logit_bias", None)
        return None if bias is None else float(bias.item())

    def probabilities(self, cosines: torch.Tensor) -> torch.Tensor:
        """The model's own probabilities from `cos(image, text)` `[B, T]`: a softmax over the
        prompts of `scale · cos` (CLIP), or `sigmoid(scale · cos + bias)` per prompt (SigLIP)."""
        logits, bias = self.logit_scale * cosines, self.logit_bias
        if bias is not None:
            return torch.sigmoid(logits + bias)
        return logits.softmax(dim=-1)

    @property
    def content_identity(self) -> dict[str, Any]:
        """What the model computes with: architecture, weights (by content), input size —
        not where the weights file lies. Resume keys and caches use it."""
        return {k: v for k, v in self.identity.items() if k != "weights_file"}

    @property
    def key(self) -> str:
        """A short hash of the model's identity (architecture and weights), for caches."""
        blob = json.dumps(
            {k: self.identity.get(k) for k in ("model", "pretrained", "weights", "config")},
            sort_keys=True,
        )
        return hashlib.sha1(blob.encode()).hexdigest()[:16]

    def memo(self, key: Hashable, build: Callable[[], T]) -> T:
        """A value cached on this backend (positions per grid, ECLIP heads, concept banks):
        built once per key, gone with the backend."""
        if key not in self._memo:
            self._memo[key] = build()
        return self._memo[key]

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    # -- text --------------------------------------------------------------------------------

    def encode_texts(
        self,
        prompts: Sequence[str],
        ensemble: bool = True,
        progress: Callable[[int, int], None] | None = None,
    ) -> Texts:
        """Unit-length embeddings of `prompts`, through the template ensemble unless disabled.

        progress: called with (done, total) prompts as uncached ones are embedded in chunks.
        """
        rows = self.text_cache.get(list(prompts), ensemble, self.embed_texts, progress)
        return Texts(list(prompts), torch.stack(rows).to(self.device), ensemble)

    def truncated(self, prompts: Sequence[str], ensemble: bool = True) -> list[str]:
        """The prompts the tokenizer cuts at its context length (through the longest ensemble
        template when `ensemble`): their ends do not reach the text tower."""
        template = max(ensemble_templates(), key=len) if ensemble else "{}"
        texts = [template.format(p) for p in prompts]
        if hasattr(self.tokenizer, "too_long"):  # transformers tokenizers
            cut = set(self.tokenizer.too_long(texts))
            return [p for p, t in zip(prompts, texts, strict=True) if t in cut]
        tokens = self.tokenizer(texts)
        return [p for p, last in zip(prompts, tokens[:, -1].tolist(), strict=True) if last != 0]

    @torch.no_grad()
    def embed_texts(self, prompts: list[str], ensemble: bool) -> list[torch.Tensor]:
        """Unit-length embeddings (on the CPU) computed now, without the caches: for bulk
        texts such as thousands of WordNet definitions, which keep a cache of their own."""
        templates = ensemble_templates() if ensemble else ["{}"]
        sentences = [t.format(p) for p in prompts for t in templates]
        chunks = []
        for i in range(0, len(sentences), 256):
            tokens = self.tokenizer(sentences[i : i + 256]).to(self.device)
            with self.autocast():
                chunks.append(F.normalize(self.model.encode_text(tokens).float(), dim=-1))
        per_template = torch.cat(chunks).view(len(prompts), len(templates), -1)
        mean = F.normalize(per_template.mean(dim=1), dim=-1)
        return [row.cpu() for row in mean]

    # -- images ------------------------------------------------------------------------------

    def grid_size(self, images: torch.Tensor) -> tuple[int, int]:
        """Spatial size `(h, w)` of the dense maps for inputs shaped like `images`."""
        return self.vision.grid((images.shape[-2], images.shape[-1]))

    def dense_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Unit-length joint-space tokens `[B, 1+N, D]`; token 0 is the global image embedding."""
        with torch.no_grad(), self.autocast():
            tokens = self.vision.tokens(images.to(self.device))
        return F.normalize(tokens.float(), dim=-1)

    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """The stock global image embeddings `[B, D]`, unit length (at the backend's resolution):
        token 0 of `dense_tokens`, without computing the others."""
        with torch.no_grad(), self.autocast():
            embeddings = self.vision.image_embedding(images.to(self.device))
        return F.normalize(embeddings.float(), dim=-1)
