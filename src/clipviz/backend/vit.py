"""open_clip's `VisionTransformer`, as the methods read it.

Methods address blocks by index and never touch open_clip modules: this adapter gives the
token stream block by block, a block's attention q/k/v and its branches, and the pooling
head. Nothing here modifies the model: positional embeddings for other input sizes are
interpolated copies, cached on the backend.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from ..errors import ClipvizError
from .towers import TOKENS, LinearHeadTower, Memo, register_adapter

if TYPE_CHECKING:
    from .coca import AttentionalPool


def interpolate_positions(
    pos: torch.Tensor, src: tuple[int, int], grid: tuple[int, int], prefix: int = 1
) -> torch.Tensor:
    """`pos` (`[prefix + N, C]`, laid out on `src` after `prefix` tokens) resized to `grid`,
    bilinearly; the prefix rows are kept as they are."""
    if tuple(src) == tuple(grid):
        return pos
    with torch.no_grad():
        spatial = pos[prefix:].detach().float().reshape(1, *src, -1).permute(0, 3, 1, 2)
        spatial = F.interpolate(spatial, size=grid, mode="bilinear", align_corners=False)
        spatial = spatial.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], -1)
        return torch.cat([pos[:prefix].detach().float(), spatial]).to(pos.dtype)


def attention_probs(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: float | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention probabilities `softmax(q·kᵀ·scale + bias)` `[B, heads, Lq, Lk]` from per-head
    queries and keys (`scale`: `head_dim^-½` unless given; `bias`: e.g. a relative position
    bias, broadcast over the batch)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = (q * scale) @ k.transpose(-2, -1)
    # a float32 bias lifts low-precision logits to float32, as timm's unfused attention does
    return (logits if bias is None else logits + bias).softmax(dim=-1)


class TokenTowerBase:
    """What every token tower computes the same way from the pieces its adapter gives
    (`embed`, `run_block`, `head`, `pooled`; `norm1`, `qkv`, `attn_out`, `mlp`), with the
    scale and the bias some families give their attention logits: `run_blocks`, `tokens`,
    `image_embedding`, `attend` and `block_with_attention`, once."""

    kind = TOKENS

    @property
    def depth(self) -> int:
        raise NotImplementedError

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def run_block(self, i: int, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def head(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def run_blocks(self, x: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Stock blocks `start … stop-1` in turn."""
        for i in range(start, self.depth if stop is None else stop):
            x = self.run_block(i, x)
        return x

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        """The stock forward as joint-space tokens `[B, 1+N, D]` (not normalised)."""
        return self.head(self.run_blocks(self.embed(images)))

    def image_embedding(self, images: torch.Tensor) -> torch.Tensor:
        """The stock forward's image embedding `[B, D]` alone (not normalised)."""
        return self.pooled(self.run_blocks(self.embed(images)))

    def norm1(self, i: int, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def qkv(self, i: int, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def attn_out(self, i: int, heads_out: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def mlp(self, i: int, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def attention_scale(self, i: int) -> float | None:
        """What block `i` multiplies its logits `q·kᵀ` by (None: `head_dim^-½`)."""
        return None

    def attention_bias(self, i: int) -> torch.Tensor | None:
        """What block `i` adds to its attention logits `[1, heads, L, L]` (None: nothing)."""
        return None

    def attend(self, i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Block `i`'s own attention on its queries, keys and values (per head
        `softmax(q·kᵀ·scale + bias)·v`, fused: the probabilities are never materialised)."""
        bias = self.attention_bias(i)
        return F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=None if bias is None else bias.to(q.dtype),
            scale=self.attention_scale(i),
        )

    def block_with_attention(
        self, i: int, x: torch.Tensor, normed: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Block `i` computed explicitly: its output `[B, L, W]` and attention probabilities
        `[B, heads, L, L]` (the stock fused attention never materialises them). `normed`: the
        block's `norm1(x)` when the caller holds it (e.g. to take gradients there)."""
        q, k, v = self.qkv(i, self.norm1(i, x) if normed is None else normed)
        probs = attention_probs(q, k, self.attention_scale(i), self.attention_bias(i))
        x = x + self.attn_out(i, probs.to(v.dtype) @ v)
        return x + self.mlp(i, x), probs


class OpenClipBlocks:
    """The pieces of open_clip's `ResidualAttentionBlock`s, by index: what the image and the
    text transformers share."""

    _blocks: list[Any]
    _name: str
    explicit_attention: bool

    def _explicit(self, i: int) -> Any:
        if not self.explicit_attention:
            raise ClipvizError(
                f"{self._name}: this method needs explicit attention, which clipviz implements "
                f"for standard open_clip ViT blocks only (not {type(self._blocks[i]).__name__})"
            )
        return self._blocks[i]

    def norm1(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Block `i`'s pre-attention norm `ln_1(x)`."""
        return self._explicit(i).ln_1(x)

    def qkv(self, i: int, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys and values of block `i` on `h` (`[B, L, W]`, already through
        `norm1`), each `[B, heads, L, head_dim]`, from the block's own weights."""
        attn = self._explicit(i).attn
        B, L, W = h.shape
        heads = attn.num_heads
        qkv = F.linear(h, attn.in_proj_weight, attn.in_proj_bias)  # [B, L, 3W]
        qkv = qkv.view(B, L, 3, heads, W // heads).permute(2, 0, 3, 1, 4)
        return qkv[0], qkv[1], qkv[2]

    def attn_out(self, i: int, heads_out: torch.Tensor) -> torch.Tensor:
        """Block `i`'s attention branch from per-head outputs `[B, heads, L, head_dim]`:
        merge heads, `out_proj`, layer scale -> what the block adds to the stream `[B, L, W]`."""
        block = self._explicit(i)
        B, H, L, d = heads_out.shape
        merged = heads_out.transpose(1, 2).reshape(B, L, H * d)
        return block.ls_1(block.attn.out_proj(merged))

    def mlp(self, i: int, y: torch.Tensor) -> torch.Tensor:
        """Block `i`'s MLP branch `ls_2(mlp(ln_2(y)))`."""
        block = self._explicit(i)
        return block.ls_2(block.mlp(block.ln_2(y)))

    def head_outputs(self, i: int, mixed: torch.Tensor) -> torch.Tensor:
        """What each head of block `i` adds to the stream, heads not summed: per-head mixed
        values `[..., heads, d]` -> `[..., heads, W]` (the head's slice of `out_proj`, layer
        scale; the `out_proj` bias, shared by the heads, left out: it is `attn_out` of 0)."""
        block = self._explicit(i)
        H, d = mixed.shape[-2], mixed.shape[-1]
        weight = block.attn.out_proj.weight.view(-1, H, d)  # [W, heads, d]
        return block.ls_1(torch.einsum("...hd,whd->...hw", mixed, weight))

    def head_directions(self, i: int, directions: torch.Tensor) -> torch.Tensor:
        """The per-head value directions `[heads, d, T]` whose dot product with a head's
        mixed values equals the dot product of what the head adds (`head_outputs`) with each
        stream direction `[T, W]`."""
        block = self._explicit(i)
        H = block.attn.num_heads
        weight = block.attn.out_proj.weight  # [W, heads·d]
        return (block.ls_1(directions) @ weight).T.reshape(H, -1, directions.shape[0])


def _is_open_clip_vit(visual: Any) -> bool:
    from open_clip.transformer import VisionTransformer

    return isinstance(visual, VisionTransformer)


@register_adapter(_is_open_clip_vit)
class ViTTower(OpenClipBlocks, TokenTowerBase):
    """An open_clip ViT image tower: class token, then `h × w` patch tokens."""

    prefix = 1  # tokens before the patches (the class token), kept as keys, left out of maps

    def __init__(self, visual: Any, memo: Memo, name: str) -> None:
        from open_clip.transformer import ResidualAttentionBlock

        self.visual = visual
        self._memo = memo
        self._name = name
        self._blocks = list(visual.transformer.resblocks)
        # newer open_clip versions dropped the attribute: their blocks are always batch-first
        self._batch_first = bool(getattr(visual.transformer, "batch_first", True))
        self.explicit_attention = all(isinstance(b, ResidualAttentionBlock) for b in self._blocks)
        self.readout = "class"
        base = {"readout", "class_token", "eclip"}
        if getattr(visual, "pool_type", "tok") == "tok":
            base.add("linear_head")  # embedding = ln_post(class token) @ proj
        self.latent: AttentionalPool | None = None
        if getattr(visual, "attn_pool", None) is not None:
            if getattr(visual, "attn_pool_contrastive", None) is not None:
                raise ClipvizError(
                    f"{name}: open_clip's parallel/cascade attentional pools (marked untested "
                    "there) are not supported; CoCa's original pool is"
                )
            from .coca import AttentionalPool

            self.latent = AttentionalPool(visual)  # CoCa: latent queries read the tokens
            self.readout = "latent"
            base = {"readout", "probe", "eclip"}
        self.capabilities = frozenset(base | ({"attention"} if self.explicit_attention else set()))

    trains_post_norm = True  # ECLIP's explain inputs are `ln_post` of the patch tokens

    @property
    def family(self) -> str:
        pool = ", attentional pool" if self.latent is not None else ""
        return f"open_clip ViT{pool}"

    # -- shape ------------------------------------------------------------------------------

    @property
    def depth(self) -> int:
        """Number of transformer blocks."""
        return len(self._blocks)

    @property
    def heads(self) -> int:
        return int(self._blocks[0].attn.num_heads)

    def grid(self, size: tuple[int, int]) -> tuple[int, int]:
        """Patch grid `(h, w)` for an input of `size` (H, W)."""
        ph, pw = self.visual.patch_size
        return size[0] // ph, size[1] // pw

    def check_size(self, size: tuple[int, int]) -> None:
        ph, pw = self.visual.patch_size
        if size[0] % ph or size[1] % pw:
            raise ClipvizError(
                f"input size {size[0]}x{size[1]} is not a multiple of the patch size {ph}; "
                "choose a `resolution` that is"
            )

    # -- the token stream -------------------------------------------------------------------

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Patch + class embeddings with (interpolated) positions, after `ln_pre`: `[B, 1+N, W]`."""
        v = self.visual
        self.check_size((images.shape[-2], images.shape[-1]))
        x = v.conv1(images)  # [B, W, h, w]
        grid = (x.shape[-2], x.shape[-1])
        x = x.flatten(2).transpose(1, 2)
        cls = v.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        src = tuple(v.grid_size)
        pos = self._memo(
            ("vit-positions", grid),
            lambda: interpolate_positions(v.positional_embedding, src, grid),
        )
        return v.ln_pre(x + pos.to(x.dtype))

    def run_block(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Stock block `i` on batch-first tokens `[B, L, W]`."""
        block = self._blocks[i]
        if self._batch_first:
            return block(x)
        return block(x.transpose(0, 1)).transpose(0, 1)

    # -- the head ---------------------------------------------------------------------------

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens `[..., W]` into the joint space: `ln_post(x) @ proj` (not normalised)."""
        return self.post_norm(x) @ self.proj

    def mean_embedding(self, x: torch.Tensor) -> torch.Tensor:
        """The embedding of the mean over all tokens `[B, L, W]` (LeGrad's feature)."""
        return self.project(x.mean(dim=1))

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Last-block tokens `[B, 1+N, W]` -> joint-space tokens `[B, 1+N, D]` (not normalised).

        Token 0 is the model's own pooled image embedding (its pooling: class token or
        average); the patches go through `ln_post` and `proj`.
        """
        v = self.visual
        pooled, _ = v._pool(x)  # open_clip's pooling; no public API returns it unprojected
        if self.latent is not None:  # CoCa: each patch through the pooler's value path
            patches = v.ln_post(self.latent.value_path(x[:, self.prefix :]))
        else:
            patches = v.ln_post(x[:, self.prefix :])
        return torch.cat([pooled[:, None], patches], dim=1) @ v.proj

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """Token 0 of `head`, alone: the model's own image embedding `[B, D]` (not normalised)."""
        return self.visual._pool(x)[0] @ self.visual.proj

    @property
    def proj(self) -> torch.Tensor:
        """The stock projection `[W, D]`."""
        return self.visual.proj

    def explain_inputs(self, x: torch.Tensor) -> torch.Tensor:
        """What the final linear map into the joint space reads at each patch: `ln_post` of
        the last block's patch tokens `[B, N, W]` (CoCa: of their value path through the
        pooler); ECLIP's explain projection replaces the map."""
        patches = x[:, self.prefix :]
        if self.latent is not None:
            patches = self.latent.value_path(patches)
        return self.visual.ln_post(patches)

    # -- the attentional pooler as a probe (CoCa; see `coca.py`) ------------------------------

    pool_sees_prefix = True  # the pooler reads the class token too

    def _latent(self) -> AttentionalPool:
        if self.latent is None:
            raise ClipvizError(f"{self._name}: the tower has no attentional pool to read")
        return self.latent

    def pool_input(self, x: torch.Tensor, norm: bool = True) -> torch.Tensor:
        """What the pooler attends over: every token (its own `ln_k` is applied inside)."""
        return x

    def latent_probs(self, tokens: torch.Tensor) -> torch.Tensor:
        """The contrastive query's attention `[B, heads, 1, L]` over `tokens`."""
        return self._latent().probs(tokens)

    def pool_from_probs(self, tokens: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        """The contrastive query's output `[B, d]` given its attention `probs`."""
        return self._latent().output(tokens, probs)

    def patch_columns(self, probs: torch.Tensor) -> torch.Tensor:
        return probs[..., self.prefix :]

    def after_pool(self, pooled: torch.Tensor) -> torch.Tensor:
        """A pooled feature through the rest of the head: `ln_post`, `proj`."""
        return self.visual.ln_post(pooled) @ self.visual.proj

    def explain_projection(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The final linear map into the joint space: weight `[W, D]` and bias (None)."""
        return self.visual.proj, None

    @property
    def post_norm(self) -> Any:
        """The stock `ln_post` module."""
        return self.visual.ln_post

    def cascade(self) -> list[tuple[str, list[Any]]]:
        """The tower's layers from the top (head, then blocks last to first), as modules or
        parameters: the order in which a randomisation test re-draws them."""
        v = self.visual
        head = [m for m in (v.ln_post, v.proj) if m is not None]
        return [
            ("head", head),
            *((f"block {i}", [self._blocks[i]]) for i in reversed(range(self.depth))),
        ]


if TYPE_CHECKING:  # the interface the adapter offers, checked by mypy
    _ViTTower: type[LinearHeadTower] = ViTTower
