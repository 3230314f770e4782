"""Hugging Face `transformers` CLIP and SigLIP models (`CLIPModel`, `SiglipModel`), as the
methods read them.

`HFVision` holds the vision transformer and its projection; `HFViTTower` gives the methods
the same interface as the other transformer towers (blocks by index, q/k/v, branches, head),
recomputing each encoder layer from its own modules. `HFModel` gives the backend what it asks
of a CLIP: `visual`, `encode_text`, `encode_image`, `logit_scale` (and `logit_bias`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ClipvizError
from .towers import LinearHeadTower, Memo, register_adapter
from .vit import TokenTowerBase, attention_probs


def naflex_patches(images: torch.Tensor, patch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """SigLIP2 NaFlex inputs of a batch `[B, 3, H, W]`: flattened patches `[B, h·w, p·p·3]`
    in the order of `Siglip2ImageProcessor` (rows of patches; within a patch its rows, its
    columns, then the channels) and the spatial shapes `[B, 2]` (`h`, `w`)."""
    B, C, H, W = images.shape
    h, w = H // patch, W // patch
    x = images.permute(0, 2, 3, 1).reshape(B, h, patch, w, patch, C)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(B, h * w, patch * patch * C)
    shapes = torch.tensor([[h, w]] * B, device=images.device)
    return x, shapes


class HFVision(nn.Module):
    """A transformers vision tower: `vision_model`, and `projection` (CLIP) or None (SigLIP,
    SigLIP2). SigLIP2's NaFlex tower reads patch sequences: a square batch is cut into them,
    every patch valid."""

    def __init__(self, vision_model: Any, projection: Any | None) -> None:
        super().__init__()
        self.vision_model = vision_model
        self.projection = projection
        self.naflex = type(vision_model.embeddings).__name__ == "Siglip2VisionEmbeddings"

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.naflex:
            patches, shapes = naflex_patches(images, self.vision_model.embeddings.patch_size)
            mask = torch.ones(patches.shape[:2], dtype=torch.long, device=images.device)
            out = self.vision_model(pixel_values=patches, pixel_attention_mask=mask,
                                    spatial_shapes=shapes)  # fmt: skip
        else:
            out = self.vision_model(pixel_values=images)
        pooled = out.pooler_output
        return pooled if self.projection is None else self.projection(pooled)


class HFModel(nn.Module):
    """A transformers CLIP or SigLIP model behind the interface the backend uses."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.hf = model
        vision = getattr(model.vision_model, "vision_model", model.vision_model)  # v4 nests it
        self.visual = HFVision(vision, getattr(model, "visual_projection", None))
        self.logit_scale = model.logit_scale
        bias = getattr(model, "logit_bias", None)
        if bias is not None:
            self.logit_bias = bias

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.visual(images)

    def encode_text(self, tokens: Any) -> torch.Tensor:
        out = self.hf.get_text_features(**tokens)
        return out if torch.is_tensor(out) else out.pooler_output


class HFTokenizer:
    """The model's tokenizer as the backend calls it: texts -> padded inputs."""

    def __init__(self, tokenizer: Any, siglip: bool, positions: int | None = None) -> None:
        """positions: the text tower's `max_position_embeddings`; the text length is the
        tokenizer's `model_max_length` where it sets one within it (a tokenizer saved without
        one, or Gemma's, says 1e30)."""
        self.tokenizer = tokenizer
        self.siglip = siglip  # SigLIP pools its last token: always pad to the full length
        own = getattr(tokenizer, "model_max_length", None)
        lengths = [n for n in (own, positions) if isinstance(n, int) and 0 < n <= 2**20]
        self.context_length = min(lengths) if lengths else 77

    def too_long(self, texts: list[str]) -> list[str]:
        """The texts with more tokens than the context holds (they are cut)."""
        ids = self.tokenizer(list(texts), truncation=False)["input_ids"]
        return [t for t, i in zip(texts, ids, strict=True) if len(i) > self.context_length]

    def __call__(self, texts: list[str]) -> Any:
        return self.tokenizer(
            list(texts),
            padding="max_length" if self.siglip else True,
            truncation=True,
            max_length=self.context_length,
            return_tensors="pt",
        )


def _is_transformers_vision(visual: Any) -> bool:
    return isinstance(visual, HFVision)


@register_adapter(_is_transformers_vision)
class HFViTTower(TokenTowerBase):
    """A transformers CLIP or SigLIP vision transformer."""

    trains_post_norm = False

    def __init__(self, visual: HFVision, memo: Memo, name: str) -> None:
        self.visual = visual
        self.vm = visual.vision_model
        self._memo = memo
        self._name = name
        self._layers = list(self.vm.encoder.layers)
        self.siglip = getattr(self.vm, "head", None) is not None
        self.prefix = 0 if self.siglip else 1
        self.readout = "latent" if self.siglip else "class"
        self.pooling = "map" if self.siglip else "token"
        self.explicit_attention = True
        caps = {"attention", "readout", "probe" if self.siglip else "class_token", "eclip"}
        if not self.siglip and visual.projection is not None:
            caps.add("linear_head")  # embedding = post_layernorm(class token) @ projection
        self.capabilities = frozenset(caps)

    @property
    def family(self) -> str:
        if self.visual.naflex:
            return "transformers SigLIP2 (NaFlex)"
        return "transformers SigLIP" if self.siglip else "transformers CLIP"

    @property
    def depth(self) -> int:
        return len(self._layers)

    @property
    def heads(self) -> int:
        return int(self._layers[0].self_attn.num_heads)

    def grid(self, size: tuple[int, int]) -> tuple[int, int]:
        p = self.vm.embeddings.patch_size
        return size[0] // p, size[1] // p

    def check_size(self, size: tuple[int, int]) -> None:
        p = self.vm.embeddings.patch_size
        if size[0] % p or size[1] % p:
            raise ClipvizError(
                f"input size {size[0]}x{size[1]} is not a multiple of the patch size {p}; "
                "choose a `resolution` that is"
            )

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Patch (and class) embeddings with positions, interpolated for other sizes by the
        model's own `interpolate_pos_encoding` (its weights untouched)."""
        self.check_size((images.shape[-2], images.shape[-1]))
        emb = self.vm.embeddings
        if self.visual.naflex:  # SigLIP2: positions resized to the grid by the model itself
            return emb(*naflex_patches(images, emb.patch_size))
        native = getattr(emb, "image_size", None)
        other = native is not None and tuple(images.shape[-2:]) != (native, native)
        x = emb(images, interpolate_pos_encoding=other)
        pre = getattr(self.vm, "pre_layrnorm", None)
        return pre(x) if pre is not None else x

    def norm1(self, i: int, x: torch.Tensor) -> torch.Tensor:
        return self._layers[i].layer_norm1(x)

    def qkv(self, i: int, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        attn = self._layers[i].self_attn
        B, L, _ = h.shape
        H = attn.num_heads

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(B, L, H, -1).transpose(1, 2)

        return split(attn.q_proj(h)), split(attn.k_proj(h)), split(attn.v_proj(h))

    def attention_scale(self, i: int) -> float | None:
        """The layer's own `scale` (None: `head_dim^-½`)."""
        return getattr(self._layers[i].self_attn, "scale", None)

    def attn_out(self, i: int, heads_out: torch.Tensor) -> torch.Tensor:
        B, H, L, d = heads_out.shape
        return self._layers[i].self_attn.out_proj(heads_out.transpose(1, 2).reshape(B, L, H * d))

    def mlp(self, i: int, y: torch.Tensor) -> torch.Tensor:
        layer = self._layers[i]
        return layer.mlp(layer.layer_norm2(y))

    def head_outputs(self, i: int, mixed: torch.Tensor) -> torch.Tensor:
        """Per-head contributions `[..., heads, W]` (bias left out), as `ViTTower`'s."""
        H, d = mixed.shape[-2], mixed.shape[-1]
        weight = self._layers[i].self_attn.out_proj.weight.view(-1, H, d)
        return torch.einsum("...hd,whd->...hw", mixed, weight)

    def head_directions(self, i: int, directions: torch.Tensor) -> torch.Tensor:
        """Per-head value directions `[heads, d, T]` of stream directions `[T, W]`."""
        attn = self._layers[i].self_attn
        return (directions @ attn.out_proj.weight).T.reshape(attn.num_heads, -1, len(directions))

    def run_block(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Encoder layer `i`, computed from its modules (the same numbers as its forward), its
        attention fused: methods that read the probabilities call `block_with_attention`."""
        q, k, v = self.qkv(i, self.norm1(i, x))
        x = x + self.attn_out(i, self.attend(i, q, k, v))
        return x + self.mlp(i, x)

    # -- the head ---------------------------------------------------------------------------

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        proj = self.visual.projection
        return x if proj is None else proj(x)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """A pooled feature `[..., W]` into the joint space."""
        return self._project(self.vm.post_layernorm(x))

    def mean_embedding(self, x: torch.Tensor) -> torch.Tensor:
        """The embedding of the mean over all tokens `[B, L, W]` (LeGrad's feature)."""
        return self.project(x.mean(dim=1))

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """Token 0 of `head`, alone: the model's own image embedding `[B, D]` (not normalised)."""
        if not self.siglip:
            return self.project(x[:, 0])
        return self.vm.head(self.vm.post_layernorm(x))

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """`[B, prefix + N, W]` -> `[B, 1 + N, D]`: the model's own pooled embedding, then each
        patch through the head (SigLIP: the probe's value path, `out_proj(v)` plus its MLP)."""
        if not self.siglip:
            return self.project(x)  # the class token is token 0 already
        x = self.vm.post_layernorm(x)
        pooled = self.vm.head(x)
        return torch.cat([pooled[:, None], self._value_path(x)], dim=1)

    def explain_inputs(self, x: torch.Tensor) -> torch.Tensor:
        """What the final linear map reads at each patch: `post_layernorm` of the patches
        (CLIP), or SigLIP's dense token itself (the probe's value path; no projection)."""
        x = self.vm.post_layernorm(x)
        return self._value_path(x) if self.siglip else x[:, 1:]

    def explain_projection(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`visual_projection` `[W, D]` (CLIP, no bias), or the identity (SigLIP)."""
        proj = self.visual.projection
        if proj is None:
            dim = int(self.vm.post_layernorm.weight.shape[0])
            return torch.eye(dim, device=self.vm.post_layernorm.weight.device), None
        return proj.weight.T, proj.bias

    def _value_path(self, tokens: torch.Tensor) -> torch.Tensor:
        return self._probe_out(self._probe_values(tokens))

    def _probe_values(self, tokens: torch.Tensor) -> torch.Tensor:
        """The probe's values of `tokens` `[B, N, W]`, heads not split."""
        attn, W = self.vm.head.attention, tokens.shape[-1]
        return F.linear(tokens, attn.in_proj_weight[2 * W :], attn.in_proj_bias[2 * W :])

    def _probe_out(self, mixed: torch.Tensor) -> torch.Tensor:
        """The probe after its attention: `y = out_proj(mixed)`, `y + mlp(layernorm(y))`."""
        head = self.vm.head
        y = head.attention.out_proj(mixed)
        return y + head.mlp(head.layernorm(y))

    # -- the MAP probe (SigLIP) -------------------------------------------------------------

    pool_sees_prefix = False

    def pool_input(self, x: torch.Tensor, norm: bool = True) -> torch.Tensor:
        return self.vm.post_layernorm(x) if norm else x

    def latent_probs(self, tokens: torch.Tensor) -> torch.Tensor:
        head = self.vm.head
        attn = head.attention
        B, N, W = tokens.shape
        H = attn.num_heads
        probe = head.probe.expand(B, -1, -1)
        q = F.linear(probe, attn.in_proj_weight[:W], attn.in_proj_bias[:W])
        k = F.linear(tokens, attn.in_proj_weight[W : 2 * W], attn.in_proj_bias[W : 2 * W])
        q = q.reshape(B, -1, H, W // H).transpose(1, 2)
        k = k.reshape(B, N, H, W // H).transpose(1, 2)
        return attention_probs(q, k)

    def pool_from_probs(self, tokens: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        B, N, W = tokens.shape
        H = self.vm.head.attention.num_heads
        v = self._probe_values(tokens).reshape(B, N, H, W // H).transpose(1, 2)
        return self._probe_out((probs @ v).transpose(1, 2).reshape(B, -1, W))[:, 0]

    def patch_columns(self, probs: torch.Tensor) -> torch.Tensor:
        return probs

    def after_pool(self, pooled: torch.Tensor) -> torch.Tensor:
        return self._project(pooled)

    @property
    def proj(self) -> torch.Tensor:
        if self.visual.projection is None:
            raise ClipvizError(
                f"{self._name}: the image tower has no projection to copy; ECLIP and TextSpan "
                "need one: choose another method, or a model whose tower ends in a projection"
            )
        return self.visual.projection.weight.T

    @property
    def post_norm(self) -> Any:
        return self.vm.post_layernorm

    def cascade(self) -> list[tuple[str, list[Any]]]:
        """Head (post-norm, probe, projection), then layers last to first (see `ViTTower`)."""
        parts = (self.vm.post_layernorm, getattr(self.vm, "head", None), self.visual.projection)
        head = [m for m in parts if m is not None]
        return [
            ("head", head),
            *((f"block {i}", [self._layers[i]]) for i in reversed(range(self.depth))),
        ]


if TYPE_CHECKING:  # the interface the adapter offers, checked by mypy
    _HFViTTower: type[LinearHeadTower] = HFViTTower
