"""open_clip's `ModifiedResNet` (RN50, RN101, …), as the methods read it.

Its head is an attention pool: a query from the mean of the `layer4` features attends to
every position. The methods need that pool with *every* position as a query, its q/k/v,
and its value path; this adapter computes them with the pool's own weights.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ..errors import ClipvizError
from .towers import RESNET, Memo, ResNetPoolTower, register_adapter
from .vit import attention_probs, interpolate_positions

STRIDE = 32  # input pixels per feature-map cell


class ResNetTower:
    """An open_clip ModifiedResNet image tower: `layer4` features and the attention pool."""

    kind = RESNET
    family = "open_clip ModifiedResNet"
    prefix = 1  # the pool's mean token

    def __init__(self, visual: Any, memo: Memo, name: str) -> None:
        self.visual = visual
        self._memo = memo
        self._name = name
        self._pool = visual.attnpool

    # the attention pool reads the image with its mean-token query
    capabilities = frozenset({"attention", "readout", "class_token", "eclip"})
    readout = "class"

    @property
    def heads(self) -> int:
        return int(self._pool.num_heads)

    def grid(self, size: tuple[int, int]) -> tuple[int, int]:
        return size[0] // STRIDE, size[1] // STRIDE

    def check_size(self, size: tuple[int, int]) -> None:
        if size[0] % STRIDE or size[1] % STRIDE:
            raise ClipvizError(
                f"input size {size[0]}x{size[1]} is not a multiple of {STRIDE} for a ResNet "
                "tower; choose a `resolution` that is"
            )

    depth = 4  # residual stages, layer1 … layer4

    def stem(self, images: torch.Tensor) -> torch.Tensor:
        """The three-convolution stem and its average pool: `[B, C0, H/4, W/4]`."""
        self.check_size((images.shape[-2], images.shape[-1]))
        return self.visual.stem(images)

    def run_stages(self, x: torch.Tensor, start: int = 0, stop: int = 4) -> torch.Tensor:
        """Residual stages `layer{start+1}` … `layer{stop}` in turn."""
        for i in range(start, stop):
            x = getattr(self.visual, f"layer{i + 1}")(x)
        return x

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """`layer4` output `[B, C, h, w]`."""
        return self.run_stages(self.stem(images))

    def pool_inputs(self, features: torch.Tensor) -> torch.Tensor:
        """Attention-pool input `[B, 1+N, C]`: the mean token then every position, with positions."""
        x = features.flatten(2).transpose(1, 2)
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1)
        pos = self._pool.positional_embedding
        side = int(round((pos.shape[0] - 1) ** 0.5))
        grid = (features.shape[-2], features.shape[-1])
        resized = self._memo(
            ("rn-positions", grid), lambda: interpolate_positions(pos, (side, side), grid)
        )
        return x + resized.to(x.dtype)

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        B, L, C = t.shape
        return t.view(B, L, self.heads, C // self.heads).transpose(1, 2)

    def pool_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The pool's queries, keys and values of `x` `[B, L, C]`, each `[B, heads, L, d]`."""
        p = self._pool
        return self._split(p.q_proj(x)), self._split(p.k_proj(x)), self._split(p.v_proj(x))

    def pool_out(self, heads_out: torch.Tensor) -> torch.Tensor:
        """Merge heads `[B, heads, L, d]` and apply the pool's output projection `c_proj`."""
        B, H, L, d = heads_out.shape
        return self._pool.c_proj(heads_out.transpose(1, 2).reshape(B, L, H * d))

    def attention_pool(self, x: torch.Tensor) -> torch.Tensor:
        """The attention pool with *every* position as a query: `[B, 1+N, C]` -> `[B, 1+N, D]`.

        Same weights as open_clip's `AttentionPool2d`, whose output is row 0 of this.
        """
        q, k, v = self.pool_qkv(x)
        return self.pool_out(attention_probs(q, k) @ v)

    def mean_query_pool(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Row 0 of `attention_pool` alone (open_clip's `AttentionPool2d` output, the image
        embedding `[B, D]`, not normalised) and its attention `[B, heads, 1, 1+N]`."""
        q, k, v = self.pool_qkv(x)
        probs = attention_probs(q[:, :, :1], k)
        return self.pool_out(probs @ v)[:, 0], probs

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """The image embedding `[B, D]` from the pool's input `[B, 1+N, C]` (not normalised)."""
        return self.mean_query_pool(x)[0]

    def value_tokens(self, features: torch.Tensor) -> torch.Tensor:
        """The pool's value path at every position of `features` `[B, C, h, w]`, without
        positions or the mean token: `c_proj(v_proj(f))` -> `[B, N, D]`."""
        return self._pool.c_proj(self._pool.v_proj(features.flatten(2).transpose(1, 2)))

    @property
    def value_projection(self) -> Any:
        """The pool's `v_proj` module."""
        return self._pool.v_proj

    @property
    def output_projection(self) -> Any:
        """The pool's `c_proj` module (`Linear(C, D)`)."""
        return self._pool.c_proj

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        """The stock forward as joint-space tokens `[B, 1+N, D]` (not normalised)."""
        return self.attention_pool(self.pool_inputs(self.features(images)))

    def image_embedding(self, images: torch.Tensor) -> torch.Tensor:
        """The stock forward's image embedding `[B, D]` alone (not normalised)."""
        return self.pooled(self.pool_inputs(self.features(images)))

    def cascade(self) -> list[tuple[str, list[Any]]]:
        """The attention pool, then the residual stages `layer4` … `layer1`."""
        v = self.visual
        return [
            ("head", [v.attnpool]),
            *((f"layer{i}", [getattr(v, f"layer{i}")]) for i in (4, 3, 2, 1)),
        ]


def _is_open_clip_resnet(visual: Any) -> bool:
    from open_clip.modified_resnet import ModifiedResNet

    return isinstance(visual, ModifiedResNet)


@register_adapter(_is_open_clip_resnet)
def resnet_tower(visual: Any, memo: Memo, name: str) -> ResNetTower:
    if getattr(visual, "attnpool", None) is None:
        raise ClipvizError(f"{name}: a ResNet tower without an attention pool is not supported")
    return ResNetTower(visual, memo, name)


if TYPE_CHECKING:  # the interface the adapter offers, checked by mypy
    _ResNetTower: type[ResNetPoolTower] = ResNetTower
