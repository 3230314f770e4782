"""timm Vision Transformers as open_clip image towers (`TimmModel`): SigLIP and SigLIP2 (MAP
head), EVA and PE-Core (rotary positions; PE-Core with a MAP head), MobileCLIP-B, ViTamin
(a convolutional stem), and the plain timm ViTs, as the methods read them.

The tower is `visual.trunk` (a timm `VisionTransformer` or `Eva`) followed by `visual.head`
(a projection, or nothing). Methods see the same interface as `ViTTower`; what differs by
family is kept here: prefix tokens (class and register tokens, left out of maps), q/k/v with
q/k norms and RoPE applied, layer scale, and the pooling head — class token, average or the
attention-pool probe (MAP), whose per-location tokens are its value path.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from ..errors import ClipvizError
from .timm_head import TimmHead
from .timm_kinds import timm_kinds
from .towers import Memo, ReadoutTower, register_adapter, timm_trunk
from .vit import TokenTowerBase


def _resample(pos: torch.Tensor, src: tuple[int, int], grid: tuple[int, int], prefix: int) -> Any:
    from timm.layers import resample_abs_pos_embed

    with torch.no_grad():
        return resample_abs_pos_embed(pos, new_size=grid, old_size=src, num_prefix_tokens=prefix)


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _unread(i: int, block: Any) -> str | None:
    """What clipviz cannot recompute in timm block `i`, in words ("block 0's DiffAttention"),
    or None: blocks and attention modules are admitted by their exact types (`timm_kinds`)."""
    kinds = timm_kinds()
    if type(block) not in kinds.pre_norm | kinds.post_norm:
        return f"block {i} ({type(block).__name__})"
    attn = block.attn
    if type(attn) not in kinds.attention:
        return f"block {i}'s {type(attn).__name__}"
    if getattr(attn, "gate", None) is not None:
        return f"block {i}'s gated {type(attn).__name__}"
    return None


def _is_timm_vit(visual: Any) -> bool:
    return type(timm_trunk(visual)) in timm_kinds().vits  # exact types (see `timm_kinds`)


def _is_timm_relpos_vit(visual: Any) -> bool:
    return type(timm_trunk(visual)) in timm_kinds().relpos_vits


@register_adapter(_is_timm_vit)
class TimmViTTower(TimmHead, TokenTowerBase):
    """An open_clip `TimmModel` whose trunk is a timm VisionTransformer or Eva."""

    trains_post_norm = False

    def __init__(self, visual: Any, memo: Memo, name: str) -> None:
        from timm.layers import HybridEmbed, PatchEmbed

        self.visual = visual
        self.trunk = visual.trunk
        self._memo = memo
        self._name = name
        self._blocks = list(self.trunk.blocks)
        self.prefix = int(getattr(self.trunk, "num_prefix_tokens", 0))
        pe = self.trunk.patch_embed
        if not isinstance(pe, PatchEmbed | HybridEmbed):
            raise ClipvizError(
                f"{name}: patch embedding {type(pe).__name__} is not supported; "
                "`clipviz models` lists the architectures clipviz explains"
            )
        self._rope_grid: tuple[int, int] | None = None
        pool = getattr(self.trunk, "attn_pool", None)
        if pool is not None:
            self.check_probe(pool)
        self.pooling = "map" if pool is not None else str(self.trunk.global_pool or "token")
        # the token a method can read as the image's query over the patches
        self.readout = {"map": "latent", "token": "class"}.get(self.pooling)
        if self.readout == "class" and self.prefix == 0:
            self.readout = None
        # the first block whose attention clipviz would not recompute faithfully
        self._unread = next(filter(None, map(_unread, range(self.depth), self._blocks)), None)
        self.explicit_attention = self._unread is None
        caps = {"attention"} if self.explicit_attention else set()
        if self.readout == "class":
            caps |= {"readout", "class_token"}
            if self.explicit_attention:
                caps.add("eclip")  # free attention: the class token's in the last block
        elif self.readout == "latent":
            caps |= {"readout", "probe", "eclip"}  # free attention: the probe's
        self.capabilities = frozenset(caps)

    @property
    def family(self) -> str:
        return f"timm {type(self.trunk).__name__}, {self.pooling} head"

    # -- shape ------------------------------------------------------------------------------

    @property
    def depth(self) -> int:
        return len(self._blocks)

    @property
    def heads(self) -> int:
        return int(self._blocks[0].attn.num_heads)

    def _reduction(self) -> tuple[int, int]:
        pe = self.trunk.patch_embed
        if hasattr(pe, "feature_ratio"):  # HybridEmbed: a convolutional stem, then patches
            fr, ps = pe.feature_ratio, pe.patch_size
            return fr[0] * ps[0], fr[1] * ps[1]
        return tuple(pe.patch_size)

    def grid(self, size: tuple[int, int]) -> tuple[int, int]:
        rh, rw = self._reduction()
        return size[0] // rh, size[1] // rw

    def check_size(self, size: tuple[int, int]) -> None:
        rh, rw = self._reduction()
        if size[0] % rh or size[1] % rw:
            raise ClipvizError(
                f"input size {size[0]}x{size[1]} is not a multiple of the tower's stride {rh}; "
                "choose a `resolution` that is"
            )
        rope = getattr(self.trunk, "rope", None)
        native = tuple(self.trunk.patch_embed.grid_size)
        cached = rope is not None and getattr(rope, "_use_cached_embed", False)
        if cached and self.grid(size) != native:
            raise ClipvizError(
                f"{self._name}: its rotary positions are fixed to a {native[0]}x{native[1]} "
                f"grid; run it at its own resolution (no `resolution`)"
            )

    # -- the token stream -------------------------------------------------------------------

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Patch tokens with (resampled) positions and the prefix tokens, after `norm_pre`:
        `[B, prefix + N, W]` (as the trunk's own `_pos_embed`, without touching its weights)."""
        from timm.layers import HybridEmbed

        t = self.trunk
        size = (images.shape[-2], images.shape[-1])
        self.check_size(size)
        grid = self.grid(size)
        pe = t.patch_embed
        if isinstance(pe, HybridEmbed):
            x = pe(images)
            if x.dim() == 4:  # NHWC
                x = x.flatten(1, 2)
        else:
            x = pe.proj(images).flatten(2).transpose(1, 2)
            x = pe.norm(x)
        B = x.shape[0]
        to_cat = [tok.expand(B, -1, -1) for tok in (t.cls_token, getattr(t, "reg_token", None))
                  if tok is not None]  # fmt: skip
        pos = t.pos_embed
        if pos is not None:
            native = tuple(pe.grid_size)
            n_pre = 0 if t.no_embed_class else self.prefix
            pos = self._memo(("timm-positions", grid), lambda: _resample(pos, native, grid, n_pre))
        if t.no_embed_class:
            x = x if pos is None else x + pos.to(x.dtype)
            x = torch.cat([*to_cat, x], dim=1)
        else:
            x = torch.cat([*to_cat, x], dim=1)
            x = x if pos is None else x + pos.to(x.dtype)
        self._rope_grid = grid
        return t.norm_pre(x)

    def _rope(self) -> torch.Tensor | None:
        rope = getattr(self.trunk, "rope", None)
        if rope is None:
            return None
        grid = self._rope_grid or tuple(self.trunk.patch_embed.grid_size)
        return self._memo(("timm-rope", grid), lambda: rope.get_embed(shape=list(grid)))

    def run_block(self, i: int, x: torch.Tensor) -> torch.Tensor:
        block = self._blocks[i]
        rope = self._rope()
        return block(x) if rope is None else block(x, rope=rope)

    def _explicit(self, i: int) -> Any:
        if self._unread is not None:
            raise ClipvizError(
                f"{self._name}: this method recomputes each block's attention, and clipviz "
                f"does not reproduce {self._unread} (it does timm's "
                f"{timm_kinds().attention_names}, ungated, in its ViT and EVA blocks); "
                "choose a method that reads no attention"
            )
        return self._blocks[i]

    def _post_norm(self, block: Any) -> bool:
        return type(block) in timm_kinds().post_norm

    def norm1(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """What block `i`'s attention reads: `norm1(x)`, or `x` itself in post-norm blocks."""
        block = self._explicit(i)
        return x if self._post_norm(block) else block.norm1(x)

    def qkv(self, i: int, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v of block `i` on `h` (after `norm1`), each `[B, heads, L, head_dim]`, with the
        block's q/k norms and, for rotary towers, RoPE on the patch tokens (as the block does)."""
        from timm.layers import apply_rot_embed_cat

        attn = self._explicit(i).attn
        B, N, _ = h.shape
        H = attn.num_heads
        if getattr(attn, "qkv", None) is not None:
            weight, bias = attn.qkv.weight, attn.qkv.bias
            if getattr(attn, "q_bias", None) is not None:  # EVA: separate q/k/v biases
                extra = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
                bias = extra if bias is None else bias + extra
            qkv = F.linear(h, weight, bias).reshape(B, N, 3, H, -1).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)
        else:
            kv_heads = getattr(attn, "num_kv_heads", H)
            q = attn.q_proj(h).reshape(B, N, H, -1).transpose(1, 2)
            k = attn.k_proj(h).reshape(B, N, kv_heads, -1).transpose(1, 2)
            v = attn.v_proj(h).reshape(B, N, kv_heads, -1).transpose(1, 2)
            if kv_heads != H:  # grouped-query attention
                k = k.repeat_interleave(H // kv_heads, dim=1)
                v = v.repeat_interleave(H // kv_heads, dim=1)
        q, k = attn.q_norm(q), attn.k_norm(k)
        rope = self._rope()
        if rope is not None:
            npt = getattr(attn, "num_prefix_tokens", self.prefix)
            half = getattr(attn, "rotate_half", False)
            q = torch.cat([q[:, :, :npt], apply_rot_embed_cat(q[:, :, npt:], rope, half=half)], 2)
            k = torch.cat([k[:, :, :npt], apply_rot_embed_cat(k[:, :, npt:], rope, half=half)], 2)
        return q.type_as(v), k.type_as(v), v

    def attn_out(self, i: int, heads_out: torch.Tensor) -> torch.Tensor:
        """What block `i`'s attention adds to the stream, from per-head outputs: merge heads,
        the attention's inner norm, `proj`, layer scale."""
        block = self._explicit(i)
        B, H, L, d = heads_out.shape
        merged = heads_out.transpose(1, 2).reshape(B, L, H * d)
        x = block.attn.proj(getattr(block.attn, "norm", _identity)(merged))
        if self._post_norm(block):  # EVA-02-E: the norm comes after the attention
            return block.norm1(x)
        return self._scale(block, 1, x)

    def mlp(self, i: int, y: torch.Tensor) -> torch.Tensor:
        """What block `i`'s MLP adds: `ls2(mlp(norm2(y)))`, or `norm2(mlp(y))` post-norm."""
        block = self._explicit(i)
        if self._post_norm(block):
            return block.norm2(block.mlp(y))
        return self._scale(block, 2, block.mlp(block.norm2(y)))

    @staticmethod
    def _scale(block: Any, n: int, x: torch.Tensor) -> torch.Tensor:
        gamma = getattr(block, f"gamma_{n}", None)  # EVA keeps layer scale as a parameter
        if gamma is not None:
            return gamma * x
        return getattr(block, f"ls{n}", lambda t: t)(x)

    def cascade(self) -> list[tuple[str, list[Any]]]:
        """Head (norms, probe, projections), then blocks last to first (see `ViTTower`)."""
        t = self.trunk
        parts = (t.norm, getattr(t, "fc_norm", None), getattr(t, "attn_pool", None), t.head,
                 self.visual.head)  # fmt: skip
        head = [m for m in parts if m is not None]
        return [
            ("head", head),
            *((f"block {i}", [self._blocks[i]]) for i in reversed(range(self.depth))),
        ]


@register_adapter(_is_timm_relpos_vit)
class TimmRelPosTower(TimmViTTower):
    """timm's `VisionTransformerRelPos`: no absolute positions; every block adds a relative
    position bias to its attention logits (its own, or one the trunk shares), zero in the rows
    and columns of the class token."""

    def check_size(self, size: tuple[int, int]) -> None:
        super().check_size(size)
        native = tuple(self.trunk.patch_embed.grid_size)
        if self.grid(size) != native:
            raise ClipvizError(
                f"{self._name}: its relative position bias is built for a {native[0]}x{native[1]} "
                "grid; run it at its own resolution (no `resolution`)"
            )

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Patch tokens after the class token, as the trunk's `forward_features` starts."""
        t = self.trunk
        self.check_size((images.shape[-2], images.shape[-1]))
        x = t.patch_embed(images)
        if t.cls_token is not None:
            x = torch.cat([t.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return x

    def _shared_bias(self) -> torch.Tensor | None:
        shared = self.trunk.shared_rel_pos
        return None if shared is None else shared.get_bias()

    def attention_bias(self, i: int) -> torch.Tensor | None:
        own = self._blocks[i].attn.rel_pos
        return self._shared_bias() if own is None else own.get_bias()

    def run_block(self, i: int, x: torch.Tensor) -> torch.Tensor:
        return self._blocks[i](x, shared_rel_pos=self._shared_bias())


if TYPE_CHECKING:  # the interface the adapter offers, checked by mypy
    _TimmViTTower: type[ReadoutTower] = TimmViTTower

    _TimmRelPosTower: type[ReadoutTower] = TimmRelPosTower
