"""CoCa's attentional pooler (open_clip `AttentionalPooler`), read as a probe.

open_clip's CoCa image tower runs the blocks, then latent queries attend over every token
(the class token included) — `attn(ln_q(queries), ln_k(x), ln_k(x))`, no residual, no MLP —
then `ln_post`; the first query's output, `@ proj`, is the image embedding. The pooler is an
attention-pool probe like SigLIP's MAP head: its first query's attention is the readout over
the patches, and each patch read alone (the attention one-hot on it) is its value path.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .vit import attention_probs


class AttentionalPool:
    """The contrastive query (query 0) of a CoCa image tower's attentional pooler."""

    def __init__(self, visual: Any) -> None:
        self.visual = visual
        self.pool = visual.attn_pool
        attn = self.pool.attn
        d = attn.embed_dim
        if attn._qkv_same_embed_dim:
            w = attn.in_proj_weight
            self._w = (w[:d], w[d : 2 * d], w[2 * d :])
        else:
            self._w = (attn.q_proj_weight, attn.k_proj_weight, attn.v_proj_weight)
        b = attn.in_proj_bias
        self._b = (None, None, None) if b is None else (b[:d], b[d : 2 * d], b[2 * d :])
        self.heads = int(attn.num_heads)

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        B, L, d = t.shape
        return t.reshape(B, L, self.heads, d // self.heads).transpose(1, 2)

    def probs(self, tokens: torch.Tensor) -> torch.Tensor:
        """Query 0's attention `[B, heads, 1, L]` over the block output `tokens` `[B, L, W]`."""
        q = F.linear(self.pool.ln_q(self.pool.query[:1]), self._w[0], self._b[0])  # [1, d]
        k = F.linear(self.pool.ln_k(tokens), self._w[1], self._b[1])
        return attention_probs(self._split(q[None].expand(len(tokens), -1, -1)), self._split(k))

    def values(self, tokens: torch.Tensor) -> torch.Tensor:
        """The pooler's values of `tokens` `[B, L, W]` -> `[B, L, d]` (heads not split)."""
        return F.linear(self.pool.ln_k(tokens), self._w[2], self._b[2])

    def output(self, tokens: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        """Query 0's output `[B, d]` (before `ln_post`) given its attention `probs`."""
        mixed = probs @ self._split(self.values(tokens))  # [B, heads, 1, d/heads]
        merged = mixed.transpose(1, 2).reshape(len(tokens), 1, -1)
        return self.pool.attn.out_proj(merged)[:, 0]

    def value_path(self, tokens: torch.Tensor) -> torch.Tensor:
        """Each token read alone: `out_proj(v(ln_k(x_j)))` `[B, L, d]` (before `ln_post`)."""
        return self.pool.attn.out_proj(self.values(tokens))
