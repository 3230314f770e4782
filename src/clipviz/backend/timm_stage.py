"""Hierarchical timm towers whose last stage is global self-attention, read as a token stream:
FastViT (MobileCLIP's MCi, attention blocks in its last stage) and Swin (whose last stage's
window covers the whole feature map at the native size, unshifted).

The stream is that stage's map flattened to tokens `[B, h*w, C]` (row-major, no prefix
token); its blocks are given by index as `ViTTower`'s are — the norm before the attention, q,
k, v, the relative position bias (Swin), the attention's output with its layer scale, the
MLP branch (FastViT's is convolutional: it runs on the map). After the last block the rest of
the tower (FastViT's final convolution; Swin's final norm) and the head are those of
`TimmConvTower`: the pooled embedding, and the head at every location for the dense tokens.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from ..errors import ClipvizError
from .timm_conv import TimmConvTower
from .timm_kinds import timm_kinds
from .towers import Memo, TokenTower, register_adapter, timm_trunk
from .vit import TokenTowerBase


def reads_last_stage(trunk: Any) -> bool:
    """True if every block of the trunk's last stage attends over the whole map with an
    attention clipviz reproduces: FastViT's attention blocks, or Swin blocks whose one window
    is the map, unshifted."""
    stages = getattr(trunk, "stages", None) or getattr(trunk, "layers", None)
    blocks = list(getattr(stages[-1], "blocks", [])) if stages else []
    return bool(blocks) and all(map(_global_attention, blocks))


def _global_attention(block: Any) -> bool:
    """A block and its attention of the exact types clipviz reproduces (`timm_kinds`); a Swin
    block's window must be the whole map, unshifted."""
    kinds = timm_kinds()
    if type(block) not in kinds.stage_blocks:
        return False
    if hasattr(block, "token_mixer"):  # FastViT
        return type(block.token_mixer) in kinds.stage_attention
    return (
        type(block.attn) in kinds.stage_attention
        and not any(block.shift_size)
        and tuple(block.window_size) == tuple(block.input_resolution)
        and not block.always_partition
    )


def _reads_as_stage_tokens(visual: Any) -> bool:
    trunk = timm_trunk(visual)
    return type(trunk) in timm_kinds().maps and reads_last_stage(trunk)


@register_adapter(_reads_as_stage_tokens, priority=1)  # above `TimmConvTower`'s broader match
class TimmStageTower(TokenTowerBase):
    """An open_clip `TimmModel` (FastViT, Swin) whose last stage is read as a token stream."""

    prefix = 0
    pooling = "avg"
    readout = None
    explicit_attention = True
    depth_unit = "blocks in its last stage"  # what `depth` counts, for messages
    capabilities: frozenset[str] = frozenset({"attention"})

    def __init__(self, visual: Any, memo: Memo, name: str) -> None:
        self.maps = TimmConvTower(visual, memo, name)
        self.visual = visual
        self.trunk = visual.trunk
        self._name = name
        self._swin = type(self.trunk).__name__ == "SwinTransformer"
        stages = self.maps.stages()
        self._before, self._stage = stages[:-1], stages[-1]
        self._blocks = list(self._stage.blocks)
        self._grid: tuple[int, int] | None = None

    @property
    def family(self) -> str:
        return f"timm {type(self.trunk).__name__}, attention in the last stage"

    # -- shape ------------------------------------------------------------------------------

    @property
    def depth(self) -> int:
        """The blocks of the last stage."""
        return len(self._blocks)

    @property
    def heads(self) -> int:
        return int(self._attention(0).num_heads)

    def grid(self, size: tuple[int, int]) -> tuple[int, int]:
        return self.maps.grid(size)

    def check_size(self, size: tuple[int, int]) -> None:
        self.maps.check_size(size)

    # -- the token stream -------------------------------------------------------------------

    def _map(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens `[B, h*w, C]` -> the stage's own layout (FastViT NCHW, Swin NHWC)."""
        B, N, C = x.shape
        if self._grid is None or self._grid[0] * self._grid[1] != N:
            raise ClipvizError(
                f"{self._name}: {N} tokens were not made by the last `embed`; embed the images "
                "and run their blocks before reading the head"
            )
        if self._swin:
            return x.reshape(B, *self._grid, C)
        return x.transpose(1, 2).reshape(B, C, *self._grid)

    def _tokens(self, m: torch.Tensor) -> torch.Tensor:
        return m.flatten(1, 2) if self._swin else m.flatten(2).transpose(1, 2)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """The stream entering the last stage's first block `[B, h*w, C]`: the stem and the
        stages before, then the stage's downsampling (and FastViT's conditional positions)."""
        self.check_size((images.shape[-2], images.shape[-1]))
        t = self.trunk
        x = t.patch_embed(images) if self._swin else t.stem(images)
        for stage in self._before:
            x = stage(x)
        x = self._stage.downsample(x)
        x = getattr(self._stage, "pos_emb", lambda m: m)(x)
        self._grid = (x.shape[1], x.shape[2]) if self._swin else (x.shape[2], x.shape[3])
        return self._tokens(x)

    def run_block(self, i: int, x: torch.Tensor) -> torch.Tensor:
        return self._tokens(self._blocks[i](self._map(x)))

    def _attention(self, i: int) -> Any:
        block = self._blocks[i]
        return block.attn if self._swin else block.token_mixer

    def norm1(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """What block `i`'s attention reads: its norm of the stream (FastViT's on the map)."""
        block = self._blocks[i]
        return block.norm1(x) if self._swin else self._tokens(block.norm(self._map(x)))

    def qkv(self, i: int, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v of block `i` on `h` (after `norm1`), each `[B, heads, N, head_dim]`."""
        attn = self._attention(i)
        B, N, _ = h.shape
        qkv = F.linear(h, attn.qkv.weight, attn.qkv.bias)
        q, k, v = qkv.reshape(B, N, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        return q, k, v

    def attention_bias(self, i: int) -> torch.Tensor | None:
        """Swin's relative position bias of block `i` `[1, heads, N, N]`; FastViT: None."""
        return self._attention(i)._get_rel_pos_bias() if self._swin else None

    def attn_out(self, i: int, heads_out: torch.Tensor) -> torch.Tensor:
        """What block `i`'s attention adds to the stream: merge heads, `proj`, layer scale."""
        B, H, L, d = heads_out.shape
        x = self._attention(i).proj(heads_out.transpose(1, 2).reshape(B, L, H * d))
        gamma = getattr(getattr(self._blocks[i], "layer_scale_1", None), "gamma", None)
        return x if gamma is None else x * gamma.reshape(-1)

    def mlp(self, i: int, y: torch.Tensor) -> torch.Tensor:
        """What block `i`'s MLP adds: Swin `mlp(norm2(y))`; FastViT `ls2(conv_mlp(y))` on the map."""
        block = self._blocks[i]
        if self._swin:
            return block.mlp(block.norm2(y))
        return self._tokens(block.layer_scale_2(block.mlp(self._map(y))))

    # -- the head ---------------------------------------------------------------------------

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The final feature map `[B, C', h, w]` from the last block's tokens: FastViT's final
        convolution, or Swin's final norm."""
        m = self._map(x)
        if self._swin:
            return self.trunk.norm(m).permute(0, 3, 1, 2)
        return self.trunk.final_conv(m)

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """The model's own image embedding `[B, D]` from the last block's tokens."""
        return self.maps.pooled(self.features(x))

    def mean_embedding(self, x: torch.Tensor) -> torch.Tensor:
        """LeGrad's feature of a block's output: the stock rest of the tower, whose pooling is
        the mean over the locations (FastViT's final convolution is not per location)."""
        return self.pooled(x)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Last-block tokens -> `[B, 1 + N, D]`: the pooled embedding, then the head at every
        location of the final feature map."""
        f = self.features(x)
        return torch.cat([self.maps.pooled(f)[:, None], self.maps.location_tokens(f)], dim=1)

    def cascade(self) -> list[tuple[str, list[Any]]]:
        return self.maps.cascade()


if TYPE_CHECKING:  # the interface the adapter offers, checked by mypy
    _TimmStageTower: type[TokenTower] = TimmStageTower
