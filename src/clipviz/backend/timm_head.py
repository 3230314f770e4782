"""The pooling heads of timm ViT towers, as the methods read them: the class token, average
pooling or the attention-pool probe (MAP), the projections after them, and each patch's token
through the head as if it were the pooled feature (MAP: the probe's value path)."""

from __future__ import annotations

from typing import Any

import torch

from ..errors import ClipvizError
from .timm_kinds import timm_kinds
from .vit import attention_probs

# how an attention-pool probe reduces its latents' outputs, as this head reproduces it
PROBE_POOLS = ("token", "avg")  # the first latent's output; the mean over the latents


class TimmHead:
    """The head half of `TimmViTTower`: `trunk.norm`, the pooling, `fc_norm`, the trunk's head
    and open_clip's head."""

    visual: Any
    trunk: Any
    prefix: int
    pooling: str
    _name: str

    def check_probe(self, pool: Any) -> None:
        """Refuse an attention pool whose output the head would not reproduce: another module
        than timm's `AttentionPoolLatent`, position embeddings added to what it attends over
        (its dense tokens would leave them out), or latents not reduced to one vector."""
        kind = timm_kinds().probe
        admitted = type(pool) is kind  # the exact type: a subclass may change its forward
        if not admitted:
            why = f"its attention pool {type(pool).__name__} is not timm's {kind.__name__}"
        elif pool.pos_embed is not None:
            why = "its attention-pool probe adds position embeddings to the tokens it reads"
        elif pool.pool not in PROBE_POOLS:
            why = f"its attention-pool probe returns its latents unpooled (pooling {pool.pool!r})"
        else:
            return
        raise ClipvizError(
            f"{self._name}: {why}, which clipviz does not reproduce; `clipviz models` lists the "
            "architectures clipviz explains"
        )

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        """The trunk's own pooling of normed tokens `[B, prefix + N, W]` -> `[B, W]`
        (relative-position ViTs pool inline in their `forward_head`: class token or mean)."""
        pool = getattr(self.trunk, "pool", None)
        if pool is not None:
            return pool(x)
        if self.trunk.global_pool == "avg":
            return x[:, self.prefix :].mean(dim=1)
        return x[:, 0]

    def after_pool(self, pooled: torch.Tensor) -> torch.Tensor:
        """`fc_norm`, the trunk's head and open_clip's head on pooled features `[..., W]`."""
        return self.visual.head(self.trunk.head(self.trunk.fc_norm(pooled)))

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """A pooled feature `[..., W]` (e.g. a mean over tokens) into the joint space."""
        return self.after_pool(self.trunk.norm(x))

    def mean_embedding(self, x: torch.Tensor) -> torch.Tensor:
        """The embedding of the mean over all tokens `[B, L, W]` (LeGrad's feature)."""
        return self.project(x.mean(dim=1))

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """Token 0 of `head`, alone: the model's own image embedding `[B, D]` (not normalised)."""
        return self.after_pool(self._pool(self.trunk.norm(x)))

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Last-block tokens `[B, prefix + N, W]` -> joint-space tokens `[B, 1 + N, D]`: token 0
        is the model's own pooled embedding; each patch goes through the head as if it were the
        pooled feature (MAP: the probe's value path, `proj(v)` plus its MLP)."""
        t = self.trunk
        x = t.norm(x)
        pooled = self.after_pool(self._pool(x))
        patches = x[:, self.prefix :]
        if self.pooling == "map":
            patches = self._value_path(patches)
        return torch.cat([pooled[:, None], self.after_pool(patches)], dim=1)

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

    def _read_latents(self) -> torch.Tensor:
        """The probe's latents its pooled output reads `[1, latents, C]`: the first alone
        (`token` pooling) or all (`avg`)."""
        pool = self.trunk.attn_pool
        return pool.latent[:, :1] if pool.pool == "token" else pool.latent

    def latent_probs(self, tokens: torch.Tensor) -> torch.Tensor:
        """The MAP probe's attention probabilities `[B, heads, latents, L]` over `tokens`
        (what it attends over, see `pool_input`), recomputed from its own weights, for the
        latents its pooled output reads."""
        pool = self.trunk.attn_pool
        B, N, C = tokens.shape
        H = pool.num_heads
        q = pool.q(self._read_latents().expand(B, -1, -1)).reshape(B, -1, H, C // H).transpose(1, 2)
        k = pool.kv(tokens)[..., :C].reshape(B, N, H, C // H).transpose(1, 2)
        q, k = pool.q_norm(q), pool.k_norm(k)
        return attention_probs(q, k)

    def pool_from_probs(self, tokens: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        """The MAP head's output `[B, W]` given its attention `probs` over `tokens` (as
        `latent_probs` gives them; so a gradient can be taken with respect to them)."""
        pool = self.trunk.attn_pool
        B, N, C = tokens.shape
        H = pool.num_heads
        v = self._probe_values(tokens).reshape(B, N, H, C // H).transpose(1, 2)
        y = self._probe_out((probs @ v).transpose(1, 2).reshape(B, -1, C))
        return y[:, 0] if pool.pool == "token" else y.mean(dim=1)

    def patch_columns(self, probs: torch.Tensor) -> torch.Tensor:
        """Columns of a probe attention that belong to the patches."""
        return probs[..., self.prefix :] if self.pool_sees_prefix else probs

    @property
    def proj(self) -> torch.Tensor:
        """The linear projection into the joint space `[W, D]` (ECLIP copies it)."""
        for module in (getattr(self.visual.head, "proj", None), self.trunk.head):
            if isinstance(module, torch.nn.Linear):
                return module.weight.T
        raise ClipvizError(
            f"{self._name}: the image tower has no linear projection to copy; ECLIP and "
            "TextSpan need one: choose another method, or a model whose tower ends in a "
            "linear projection"
        )

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
            return self.after_pool(patches)
        if final is t.head:
            return t.fc_norm(patches)
        return t.head(t.fc_norm(patches))

    def explain_projection(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The head's last linear map: weight `[W', D]` and bias; the identity `[D, D]` where
        the head ends in none (SigLIP: the probe's output is the embedding)."""
        final = self._final_linear()
        if final is None:  # nothing linear after the pooling: the width is kept throughout
            device = next(self.trunk.parameters()).device
            return torch.eye(int(self.trunk.num_features), device=device), None
        return final.weight.T, final.bias
