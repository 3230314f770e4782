"""Convolutional and windowed timm towers as open_clip image towers (`TimmModel`): ConvNeXt,
FastViT (MobileCLIP's MCi) and Swin — the towers whose image embedding is a pooled feature map
(FastViT and Swin are read as tokens in their last stage where its attention is global, see
`timm_stage.py`, which takes the head from here).

Methods read the final feature map `[B, C, h, w]` and, CAM-style, the head applied at every
location in place of after the pooling: each location's features go through the head's
per-channel layers (its norm, its projection) into the joint space. Where everything after
the pooling is affine (FastViT, Swin), the mean of the location tokens is exactly the pooled
embedding's pre-normalisation vector; ConvNeXt's head normalises after pooling, so its
location tokens normalise each location on its own.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ..errors import ClipvizError
from .timm_kinds import timm_kinds
from .towers import MAP, ConvMapTower, Memo, register_adapter, timm_trunk


def _pools_a_map(visual: Any) -> bool:
    return type(timm_trunk(visual)) in timm_kinds().maps  # exact types (see `timm_kinds`)


@register_adapter(_pools_a_map)
class TimmConvTower:
    """An open_clip `TimmModel` whose trunk pools a feature map (ConvNeXt, FastViT, Swin)."""

    kind = MAP
    prefix = 0
    readout = None
    capabilities: frozenset[str] = frozenset()

    def __init__(self, visual: Any, memo: Memo, name: str) -> None:
        self.visual = visual
        self.trunk = visual.trunk
        self._memo = memo
        self._name = name
        self._nhwc = getattr(self.trunk, "output_fmt", "NCHW") == "NHWC"
        info = getattr(self.trunk, "feature_info", None)
        self._stride = int(info[-1]["reduction"]) if info else 32
        # windowed attention is built for one input size
        self._fixed = type(self.trunk).__name__.startswith("Swin")

    @property
    def family(self) -> str:
        return f"timm {type(self.trunk).__name__}"

    def grid(self, size: tuple[int, int]) -> tuple[int, int]:
        return size[0] // self._stride, size[1] // self._stride

    def check_size(self, size: tuple[int, int]) -> None:
        if size[0] % self._stride or size[1] % self._stride:
            raise ClipvizError(
                f"input size {size[0]}x{size[1]} is not a multiple of the tower's stride "
                f"{self._stride}; choose a `resolution` that is"
            )
        native = getattr(getattr(self.trunk, "patch_embed", None), "img_size", None)
        if self._fixed and native is not None and tuple(native) != tuple(size):
            raise ClipvizError(
                f"{self._name}: its windowed attention is built for {native[0]}x{native[1]} "
                "inputs; run it at its own resolution (no `resolution`)"
            )

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The final feature map `[B, C, h, w]` (before the head's pooling)."""
        self.check_size((images.shape[-2], images.shape[-1]))
        f = self.trunk.forward_features(images)
        return f.permute(0, 3, 1, 2) if self._nhwc else f

    def stages(self) -> list[Any]:
        return list(
            getattr(self.trunk, "stages", None) or getattr(self.trunk, "layers", None) or []
        )

    @property
    def depth(self) -> int:
        """Number of stages."""
        return len(self.stages())

    def stage_output(self, images: torch.Tensor, stage: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The output of stage `stage` `[B, C, h, w]`, requiring grad, and the image embedding
        `[B, D]` the rest of the stock forward computes from it (the stages before run as
        usual; with no weight requiring grad they record no graph). A forward hook, removed
        at once, hands the stage's output on as a tensor that requires grad."""
        read: list[torch.Tensor] = []

        def hand_on(module: Any, inputs: Any, output: torch.Tensor) -> torch.Tensor:
            out = output.detach().requires_grad_(True)
            read.append(out)
            return out

        handle = self.stages()[stage].register_forward_hook(hand_on)
        try:
            embedding = self.pooled(self.features(images))
        finally:
            handle.remove()
        grid = read[0].permute(0, 3, 1, 2) if self._nhwc else read[0]
        return grid, embedding

    def pooled(self, features: torch.Tensor) -> torch.Tensor:
        """The stock image embedding `[B, D]` from the feature map (not normalised)."""
        f = features.permute(0, 2, 3, 1) if self._nhwc else features
        return self.visual.head(self.trunk.forward_head(f))

    def location_tokens(self, features: torch.Tensor) -> torch.Tensor:
        """The head at every location: `[B, C, h, w]` -> `[B, h*w, D]` (not normalised)."""
        head = self.trunk.head
        f = features
        norm = getattr(head, "norm", None)
        if norm is not None:  # ConvNeXt: LayerNorm2d over the channels, here per location
            f = norm(f)
        f = f.flatten(2).transpose(1, 2)  # [B, N, C]
        for name in ("pre_logits", "fc"):
            layer = getattr(head, name, None)
            if layer is not None:
                f = layer(f)
        return self.visual.head(f)

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        """`[B, 1 + h*w, D]`: the pooled embedding, then the location tokens."""
        f = self.features(images)
        return torch.cat([self.pooled(f)[:, None], self.location_tokens(f)], dim=1)

    def image_embedding(self, images: torch.Tensor) -> torch.Tensor:
        """The stock forward's image embedding `[B, D]` alone (not normalised)."""
        return self.pooled(self.features(images))

    def cascade(self) -> list[tuple[str, list[Any]]]:
        """The head (the trunk's last layers, its head and open_clip's), then the stages last
        to first."""
        t = self.trunk
        # FastViT's final convolution and Swin's final norm lie between the stages and the head
        parts = (getattr(t, "final_conv", None), getattr(t, "norm", None),
                 getattr(t, "norm_pre", None), getattr(t, "head", None), self.visual.head)  # fmt: skip
        head = [m for m in parts if m is not None]
        stages = self.stages()
        return [
            ("head", head),
            *((f"stage {i}", [stages[i]]) for i in reversed(range(len(stages)))),
        ]


if TYPE_CHECKING:  # the interface the adapter offers, checked by mypy
    _TimmConvTower: type[ConvMapTower] = TimmConvTower
