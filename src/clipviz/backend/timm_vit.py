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

from typing import Any

import torch
import torch.nn.functional as F

from ..errors import ClipvizError
from .vit import Memo, attention_probs

# timm block classes whose attention clipviz recomputes: norm before (or after) the branches
PRE_NORM = frozenset({"Block", "EvaBlock"})
POST_NORM = frozenset({"EvaBlockPostNorm", "ResPostBlock"})


def _resample(pos: torch.Tensor, src: tuple[int, int], grid: tuple[int, int], prefix: int) -> Any:
    from timm.layers import resample_abs_pos_embed

    with torch.no_grad():
        return resample_abs_pos_embed(pos, new_size=grid, old_size=src, num_prefix_tokens=prefix)


class TimmViTTower:
    """An open_clip `TimmModel` whose trunk is a timm VisionTransformer or Eva."""

    kind = "vit"

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
            raise ClipvizError(f"{name}: patch embedding {type(pe).__name__} is not supported")
        self._rope_grid: tuple[int, int] | None = None
        pool = getattr(self.trunk, "attn_pool", None)
        self.pooling = "map" if pool is not None else str(self.trunk.global_pool or "token")
        # the token a method can read as the image's query over the patches
        self.readout = {"map": "latent", "token": "class"}.get(self.pooling)
        if self.readout == "class" and self.prefix == 0:
            self.readout = None
        self.explicit_attention = all(self._attention_kind(b) for b in self._blocks)
        caps = {"attention"} if self.explicit_attention else set()
        if self.readout == "class":
            caps |= {"readout", "class_token"}
            if self.explicit_attention:
                caps.add("eclip")  # free attention: the class token's in the last block
        elif self.readout == "latent":
            caps |= {"readout", "probe", "eclip"}  # free attention: the probe's
        self.capabilities = frozenset(caps)

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
        return tuple(pe.patch_size)  # type: ignore[return-value]

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
        return self._memo(("timm-rope", grid), lambda: rope.get_embed(shape=list(grid)))  # type: ignore[no-any-return]

    def run_block(self, i: int, x: torch.Tensor) -> torch.Tensor:
        block = self._blocks[i]
        rope = self._rope()
        return block(x) if rope is None else block(x, rope=rope)

    def run_blocks(self, x: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
        for i in range(start, self.depth if stop is None else stop):
            x = self.run_block(i, x)
        return x

    @staticmethod
    def _attention_kind(block: Any) -> bool:
        """Blocks whose attention clipviz recomputes: pre- or post-norm, ungated, without a
        relative position bias."""
        attn = getattr(block, "attn", None)
        if attn is None or getattr(attn, "gate", None) is not None:
            return False
        if type(block).__name__ not in PRE_NORM | POST_NORM:
            return False
        return hasattr(attn, "qkv") or hasattr(attn, "q_proj")

    def _explicit(self, i: int) -> Any:
        if not self.explicit_attention:
            kinds = sorted({type(b).__name__ for b in self._blocks})
            raise ClipvizError(
                f"{self._name}: this method needs explicit attention, which clipviz implements "
                f"for pre-norm timm ViT and EVA blocks only (not {', '.join(kinds)})"
            )
        return self._blocks[i]

    def _post_norm(self, block: Any) -> bool:
        return type(block).__name__ in POST_NORM

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

    def attend(self, i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Block `i`'s own attention on its queries, keys and values (per head
        `softmax(q·kᵀ·scale)·v`, fused: the probabilities are never materialised)."""
        return F.scaled_dot_product_attention(q, k, v)

    def attn_out(self, i: int, heads_out: torch.Tensor) -> torch.Tensor:
        """What block `i`'s attention adds to the stream, from per-head outputs: merge heads,
        the attention's inner norm, `proj`, layer scale."""
        block = self._explicit(i)
        B, H, L, d = heads_out.shape
        x = block.attn.proj(block.attn.norm(heads_out.transpose(1, 2).reshape(B, L, H * d)))
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

    def block_with_attention(
        self, i: int, x: torch.Tensor, normed: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        q, k, v = self.qkv(i, self.norm1(i, x) if normed is None else normed)
        probs = attention_probs(q, k)
        x = x + self.attn_out(i, probs @ v)
        return x + self.mlp(i, x), probs

    # -- the head ---------------------------------------------------------------------------

    def _after_pool(self, pooled: torch.Tensor) -> torch.Tensor:
        """`fc_norm`, the trunk's head and open_clip's head on pooled features `[..., W]`."""
        return self.visual.head(self.trunk.head(self.trunk.fc_norm(pooled)))

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """A pooled feature `[..., W]` (e.g. a mean over tokens) into the joint space."""
        return self._after_pool(self.trunk.norm(x))

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """Token 0 of `head`, alone: the model's own image embedding `[B, D]` (not normalised)."""
        return self._after_pool(self.trunk.pool(self.trunk.norm(x)))

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Last-block tokens `[B, prefix + N, W]` -> joint-space tokens `[B, 1 + N, D]`: token 0
        is the model's own pooled embedding; each patch goes through the head as if it were the
        pooled feature (MAP: the probe's value path, `proj(v)` plus its MLP)."""
        t = self.trunk
        x = t.norm(x)
        pooled = self._after_pool(t.pool(x))
        patches = x[:, self.prefix :]
        if self.pooling == "map":
            patches = self._value_path(patches)
        return torch.cat([pooled[:, None], self._after_pool(patches)], dim=1)

    def _value_path(self, tokens: torch.Tensor) -> torch.Tensor:
        """The attention-pool probe applied to each token alone (its attention one-hot on it):
        `y = proj(v(x))`, `y + mlp(norm(y))`."""
        return self._probe_out(self._probe_values(tokens))

    def _probe_values(self, tokens: torch.Tensor) -> torch.Tensor:
        """The probe's values of `tokens` `[B, N, C]`, heads not split."""
        return self.trunk.attn_pool.kv(tokens)[..., tokens.shape[-1] :]

    def _probe_out(self, mixed: torch.Tensor) -> torch.Tensor:
        """The probe after its attention: `y = proj(mixed)`, `y + mlp(norm(y))`."""
        pool = self.trunk.attn_pool
        y = pool.proj(mixed)
        if getattr(pool, "mlp", None) is not None:
            y = y + pool.mlp(pool.norm(y))
        return y

    def pool_input(self, x: torch.Tensor, norm: bool = True) -> torch.Tensor:
        """What the MAP probe attends over: the (normed) tokens, prefix tokens left out unless
        the trunk pools them too (EVA/PE-Core and `pool_include_prefix` do)."""
        t = self.trunk
        x = t.norm(x) if norm else x
        return x if self.pool_sees_prefix else x[:, self.prefix :]

    @property
    def pool_sees_prefix(self) -> bool:
        return type(self.trunk).__name__ == "Eva" or bool(
            getattr(self.trunk, "pool_include_prefix", False)
        )

    def latent_probs(self, tokens: torch.Tensor) -> torch.Tensor:
        """The MAP probe's attention probabilities `[B, heads, latents, L]` over `tokens`
        (what it attends over, see `pool_input`), recomputed from its own weights."""
        pool = self.trunk.attn_pool
        B, N, C = tokens.shape
        H = pool.num_heads
        q = pool.q(pool.latent.expand(B, -1, -1)).reshape(B, -1, H, C // H).transpose(1, 2)
        k = pool.kv(tokens)[..., :C].reshape(B, N, H, C // H).transpose(1, 2)
        q, k = pool.q_norm(q), pool.k_norm(k)
        return attention_probs(q, k)

    def pool_from_probs(self, tokens: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        """The MAP head's output `[B, W]` given its attention `probs` over `tokens` (so a
        gradient can be taken with respect to the probabilities)."""
        pool = self.trunk.attn_pool
        B, N, C = tokens.shape
        H = pool.num_heads
        v = self._probe_values(tokens).reshape(B, N, H, C // H).transpose(1, 2)
        y = self._probe_out((probs @ v).transpose(1, 2).reshape(B, -1, C))
        return y[:, 0] if getattr(pool, "pool_type", "token") == "token" else y.mean(dim=1)

    def patch_columns(self, probs: torch.Tensor) -> torch.Tensor:
        """Columns of a probe attention that belong to the patches."""
        return probs[..., self.prefix :] if self.pool_sees_prefix else probs

    @property
    def proj(self) -> torch.Tensor:
        """The linear projection into the joint space `[W, D]` (ECLIP copies it)."""
        for module in (getattr(self.visual.head, "proj", None), self.trunk.head):
            if isinstance(module, torch.nn.Linear):
                return module.weight.T
        raise ClipvizError(f"{self._name}: the image tower has no linear projection to copy")

    @property
    def post_norm(self) -> Any:
        return self.trunk.norm

    def _final_linear(self) -> Any | None:
        """The last linear map of the head (open_clip's `proj`, or the trunk's classifier
        when open_clip adds none), or None when the head ends otherwise (an MLP, nothing)."""
        proj = getattr(self.visual.head, "proj", None)
        if isinstance(proj, torch.nn.Linear) and getattr(self.visual.head, "mlp", None) is None:
            return proj
        has_own = any(True for _ in self.visual.head.parameters())
        if not has_own and isinstance(self.trunk.head, torch.nn.Linear):
            return self.trunk.head
        return None

    def explain_inputs(self, x: torch.Tensor) -> torch.Tensor:
        """What the head's last linear map reads at each patch of the last block's tokens
        `[B, prefix + N, W]` (the dense token itself where the head ends in none)."""
        t = self.trunk
        patches = t.norm(x)[:, self.prefix :]
        if self.pooling == "map":
            patches = self._value_path(patches)
        final = self._final_linear()
        if final is None:
            return self._after_pool(patches)
        if final is t.head:
            return t.fc_norm(patches)  # type: ignore[no-any-return]
        return t.head(t.fc_norm(patches))  # type: ignore[no-any-return]

    def explain_projection(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The head's last linear map: weight `[W', D]` and bias; the identity `[D, D]` where
        the head ends in none (SigLIP: the probe's output is the embedding)."""
        final = self._final_linear()
        if final is None:  # nothing linear after the pooling: the width is kept throughout
            device = next(self.trunk.parameters()).device
            return torch.eye(int(self.trunk.num_features), device=device), None
        return final.weight.T, final.bias

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.run_blocks(self.embed(images)))

    def image_embedding(self, images: torch.Tensor) -> torch.Tensor:
        """The stock forward's image embedding `[B, D]` alone (not normalised)."""
        return self.pooled(self.run_blocks(self.embed(images)))

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
