"""A loaded CLIP model as the methods see it (with `loading.py`, the only code that touches
open_clip and devices).

Preprocesses images, embeds texts (prompt ensembles, cached in memory and on disk) and
exposes the dense tokens and inner activations the methods read. Nothing here renders or
writes user outputs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .errors import ClipvizError
from .files import atomic_path

# CLIP's 80 ImageNet templates plus the scene templates used by CLIP Surgery / ECLIP.
SCENE_TEMPLATES = (
    "there is a {} in the scene.",
    "there is the {} in the scene.",
    "this is a {} in the scene.",
    "this is the {} in the scene.",
    "this is one {} in the scene.",
)

Precision = Literal["auto", "fp32", "bf16", "fp16"]
Crop = Literal["none", "center"]


def ensemble_templates() -> list[str]:
    """The prompt-ensemble templates, each with one `{}`."""
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    return [t("{}") for t in OPENAI_IMAGENET_TEMPLATES] + list(SCENE_TEMPLATES)


@dataclass(frozen=True)
class Texts:
    """Prompts and their unit-length embeddings `[T, D]`."""

    prompts: list[str]
    embeddings: torch.Tensor  # [T, D]
    ensemble: bool


@dataclass(frozen=True)
class Preprocess:
    """Image -> normalised tensor; picklable so image decoding can run in worker processes.

    `crop="none"` resizes the whole image to the input size (the map covers the whole
    picture); `crop="center"` is open_clip's eval transform (shortest side, centre crop).
    """

    size: tuple[int, int]  # (height, width)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop: Crop = "none"

    def __call__(self, image: Image.Image) -> torch.Tensor:
        h, w = self.size
        if self.crop == "center":
            scale = max(h / image.height, w / image.width)
            rw, rh = max(w, round(image.width * scale)), max(h, round(image.height * scale))
            image = image.resize((rw, rh), Image.Resampling.BICUBIC)
            left, top = (rw - w) // 2, (rh - h) // 2
            image = image.crop((left, top, left + w, top + h))
        else:
            image = image.resize((w, h), Image.Resampling.BICUBIC)
        x = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0)
        x = x.permute(2, 0, 1)
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        return (x - mean) / std


@dataclass
class Backend:
    """A loaded CLIP model on a device, with everything methods need to read from it."""

    model: Any  # open_clip.CLIP / CustomTextCLIP
    tokenizer: Any
    device: torch.device
    preprocess: Preprocess
    identity: dict[str, Any]
    autocast_dtype: torch.dtype | None = None
    text_cache_dir: Path | None = None
    _text_memory: dict[tuple[str, bool], torch.Tensor] = field(default_factory=dict, repr=False)
    _pos_cache: dict[tuple[str, tuple[int, int]], torch.Tensor] = field(
        default_factory=dict, repr=False
    )

    # -- model facts -------------------------------------------------------------------------

    @property
    def visual(self) -> Any:
        return self.model.visual

    @property
    def tower(self) -> Literal["vit", "rn"]:
        from open_clip.modified_resnet import ModifiedResNet
        from open_clip.transformer import VisionTransformer

        if isinstance(self.visual, VisionTransformer):
            return "vit"
        if isinstance(self.visual, ModifiedResNet):
            return "rn"
        raise ClipvizError(
            f"{self.identity['model']}: the vision tower {type(self.visual).__name__} is not "
            "supported; use an open_clip ViT or ModifiedResNet (RN50, RN101, …) model"
        )

    @property
    def input_size(self) -> tuple[int, int]:
        return self.preprocess.size

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.exp().item())

    @property
    def key(self) -> str:
        """A short hash of the model's identity, for caches."""
        blob = json.dumps(
            {k: self.identity[k] for k in ("model", "pretrained", "weights", "config")},
            sort_keys=True,
        )
        return hashlib.sha1(blob.encode()).hexdigest()[:16]

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    # -- text --------------------------------------------------------------------------------

    def encode_texts(self, prompts: Sequence[str], ensemble: bool = True) -> Texts:
        """Unit-length embeddings of `prompts`, through the template ensemble unless disabled."""
        missing = [p for p in dict.fromkeys(prompts) if (p, ensemble) not in self._text_memory]
        for p in list(missing):
            if (cached := self._load_text_cache(p, ensemble)) is not None:
                self._text_memory[(p, ensemble)] = cached
                missing.remove(p)
        if missing:
            for p, emb in zip(missing, self.embed_texts(missing, ensemble), strict=True):
                self._text_memory[(p, ensemble)] = emb
                self._store_text_cache(p, ensemble, emb)
        emb = torch.stack([self._text_memory[(p, ensemble)] for p in prompts]).to(self.device)
        return Texts(list(prompts), emb, ensemble)

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

    def _text_cache_file(self, prompt: str, ensemble: bool) -> Path | None:
        if self.text_cache_dir is None:
            return None
        digest = hashlib.sha1(f"{int(ensemble)}\0{prompt}".encode()).hexdigest()
        return self.text_cache_dir / self.key / f"{digest}.npy"

    def _load_text_cache(self, prompt: str, ensemble: bool) -> torch.Tensor | None:
        path = self._text_cache_file(prompt, ensemble)
        if path is None or not path.is_file():
            return None
        try:
            return torch.from_numpy(np.load(path, allow_pickle=False))
        except (OSError, ValueError):
            return None

    def _store_text_cache(self, prompt: str, ensemble: bool, emb: torch.Tensor) -> None:
        path = self._text_cache_file(prompt, ensemble)
        if path is None:
            return
        try:
            with atomic_path(path) as tmp, open(tmp, "wb") as f:
                np.save(f, emb.numpy().astype(np.float32), allow_pickle=False)
        except OSError:
            pass  # a read-only cache only costs speed

    # -- images ------------------------------------------------------------------------------

    def grid_size(self, images: torch.Tensor) -> tuple[int, int]:
        """Spatial size `(h, w)` of the dense maps for inputs shaped like `images`."""
        H, W = images.shape[-2:]
        if self.tower == "vit":
            ph, pw = self.visual.patch_size
            return H // ph, W // pw
        return H // 32, W // 32

    def _check_input(self, images: torch.Tensor) -> None:
        H, W = images.shape[-2:]
        if self.tower == "vit":
            ph, pw = self.visual.patch_size
            if H % ph or W % pw:
                raise ClipvizError(
                    f"input size {H}x{W} is not a multiple of the patch size {ph}; "
                    "choose a --resolution that is"
                )
        elif H % 32 or W % 32:
            raise ClipvizError(f"input size {H}x{W} is not a multiple of 32 for a ResNet tower")

    def _interpolated(
        self, name: str, pos: torch.Tensor, src: tuple[int, int], grid: tuple[int, int]
    ) -> torch.Tensor:
        """`pos` ([1+N, C], token 0 first, laid out on `src`) resized to `grid`, bilinearly.

        The result is cached per grid; the model's parameter is never modified.
        """
        if tuple(src) == tuple(grid):
            return pos
        if (name, grid) not in self._pos_cache:
            with torch.no_grad():
                spatial = pos[1:].detach().float().reshape(1, *src, -1).permute(0, 3, 1, 2)
                spatial = F.interpolate(spatial, size=grid, mode="bilinear", align_corners=False)
                spatial = spatial.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], -1)
                resized = torch.cat([pos[:1].detach().float(), spatial]).to(pos.dtype)
            self._pos_cache[(name, grid)] = resized
        return self._pos_cache[(name, grid)]

    def vit_embed(self, images: torch.Tensor) -> torch.Tensor:
        """Patch + class embeddings with (interpolated) positions, after `ln_pre`: `[B, 1+N, W]`."""
        v = self.visual
        self._check_input(images)
        x = v.conv1(images.to(self.device))  # [B, W, h, w]
        grid = (x.shape[-2], x.shape[-1])
        x = x.flatten(2).transpose(1, 2)
        cls = v.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        pos = self._interpolated("vit", v.positional_embedding, tuple(v.grid_size), grid)
        x = x + pos.to(x.dtype)
        return v.ln_pre(x)

    def vit_blocks(self) -> list[Any]:
        return list(self.visual.transformer.resblocks)

    def run_block(self, block: Any, x: torch.Tensor) -> torch.Tensor:
        """One stock transformer block on batch-first tokens `[B, L, W]`."""
        if self.visual.transformer.batch_first:
            return block(x)
        return block(x.transpose(0, 1)).transpose(0, 1)

    def attention_qkv(
        self, block: Any, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys and values of `block`'s self-attention on `x` (`[B, L, W]`, already
        through `ln_1`), each `[B, heads, L, head_dim]`, from the block's own weights."""
        from open_clip.transformer import ResidualAttentionBlock

        if not isinstance(block, ResidualAttentionBlock):
            raise ClipvizError(
                f"{self.identity['model']}: this method needs explicit attention, which clipviz "
                f"implements for standard ViT blocks only (not {type(block).__name__})"
            )
        attn = block.attn
        B, L, W = x.shape
        heads = attn.num_heads
        qkv = F.linear(x, attn.in_proj_weight, attn.in_proj_bias)  # [B, L, 3W]
        qkv = qkv.view(B, L, 3, heads, W // heads).permute(2, 0, 3, 1, 4)
        return qkv[0], qkv[1], qkv[2]

    def attention_out(self, block: Any, heads_out: torch.Tensor) -> torch.Tensor:
        """Merge heads `[B, heads, L, head_dim]` -> `[B, L, W]` and apply `out_proj`."""
        B, H, L, d = heads_out.shape
        merged = heads_out.transpose(1, 2).reshape(B, L, H * d)
        return block.attn.out_proj(merged)

    def run_block_with_attention(
        self, block: Any, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A stock block computed explicitly, returning its output `[B, L, W]` and attention
        probabilities `[B, heads, L, L]` (open_clip's own forward never materialises them)."""
        q, k, v = self.attention_qkv(block, block.ln_1(x))
        probs = ((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1)
        x = x + block.ls_1(self.attention_out(block, probs @ v))
        x = x + block.ls_2(block.mlp(block.ln_2(x)))
        return x, probs

    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """The stock global image embeddings `[B, D]`, unit length (at the backend's resolution)."""
        return self.dense_tokens(images)[:, 0]

    def vit_head(self, x: torch.Tensor) -> torch.Tensor:
        """Last-block tokens `[B, 1+N, W]` -> joint-space tokens `[B, 1+N, D]` (not normalised).

        Token 0 is the model's own pooled image embedding (class token for `tok` pooling).
        """
        v = self.visual
        if v.attn_pool is not None:
            raise ClipvizError(
                f"{self.identity['model']}: attentional-pooling vision towers are not supported"
            )
        pooled, _ = v._pool(x)
        patches = v.ln_post(x[:, 1:])
        return torch.cat([pooled[:, None], patches], dim=1) @ v.proj

    def rn_features(self, images: torch.Tensor) -> torch.Tensor:
        """ModifiedResNet `layer4` output `[B, C, h, w]`."""
        v = self.visual
        self._check_input(images)
        x = v.stem(images.to(self.device))
        return v.layer4(v.layer3(v.layer2(v.layer1(x))))

    def rn_pool_inputs(self, features: torch.Tensor) -> torch.Tensor:
        """Attention-pool input `[B, 1+N, C]`: the mean token then every position, with positions."""
        x = features.flatten(2).transpose(1, 2)
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1)
        pool = self.visual.attnpool
        side = int(round((pool.positional_embedding.shape[0] - 1) ** 0.5))
        grid = (features.shape[-2], features.shape[-1])
        pos = self._interpolated("rn", pool.positional_embedding, (side, side), grid)
        return x + pos.to(x.dtype)

    def rn_attention_pool(self, x: torch.Tensor) -> torch.Tensor:
        """The attention pool with *every* position as a query: `[B, 1+N, C]` -> `[B, 1+N, D]`.

        Same weights as open_clip's `AttentionPool2d`, whose output is row 0 of this.
        """
        pool = self.visual.attnpool
        B, L, C = x.shape
        heads = pool.num_heads
        q = pool.q_proj(x).view(B, L, heads, C // heads).transpose(1, 2)
        k = pool.k_proj(x).view(B, L, heads, C // heads).transpose(1, 2)
        v = pool.v_proj(x).view(B, L, heads, C // heads).transpose(1, 2)
        attn = ((q * (C // heads) ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(B, L, C)
        return pool.c_proj(out)

    def dense_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Unit-length joint-space tokens `[B, 1+N, D]`; token 0 is the global image embedding."""
        with torch.no_grad(), self.autocast():
            if self.tower == "vit":
                x = self.vit_embed(images)
                for block in self.vit_blocks():
                    x = self.run_block(block, x)
                tokens = self.vit_head(x)
            else:
                tokens = self.rn_attention_pool(self.rn_pool_inputs(self.rn_features(images)))
        return F.normalize(tokens.float(), dim=-1)
