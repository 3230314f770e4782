"""timm Vision Transformers with register tokens (`vit_*_reg4*`, DINOv2 with registers): extra
learned tokens after the class token that the blocks use as scratch space (Darcet et al.,
"Vision Transformers Need Registers", ICLR 2024).

The stream is `[class token, registers, patches]`. The registers are prefix tokens: methods
keep them as keys and leave them out of the maps, as they do the class token; positions are
added to the patches alone (`no_embed_class`). Everything else is the timm ViT's
(`TimmViTTower`): blocks, attention and head.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from .timm_vit import TimmViTTower, _is_timm_vit
from .towers import ReadoutTower, register_adapter, timm_trunk


def _has_registers(visual: Any) -> bool:
    return _is_timm_vit(visual) and getattr(timm_trunk(visual), "reg_token", None) is not None


@register_adapter(_has_registers, priority=1)  # above the timm ViTs it narrows
class TimmRegisterTower(TimmViTTower):
    """An open_clip `TimmModel` whose trunk is a timm VisionTransformer with register tokens."""

    @property
    def registers(self) -> int:
        """How many register tokens follow the class token."""
        return int(self.trunk.num_reg_tokens)

    @property
    def family(self) -> str:
        return f"timm {type(self.trunk).__name__}, {self.registers} registers, {self.pooling} head"

    def register_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """The register tokens of a stream `[B, prefix + N, W]`: `[B, registers, W]`."""
        return x[:, self.prefix - self.registers : self.prefix]


if TYPE_CHECKING:  # the interface the adapter offers, checked by mypy
    _TimmRegisterTower: type[ReadoutTower] = TimmRegisterTower
