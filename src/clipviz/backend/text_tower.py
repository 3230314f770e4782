"""open_clip's text transformer, block by block, for the methods that explain the text side.

The tower is CLIP's own (`model.transformer`, `token_embedding`, `ln_final`,
`text_projection`) or a `CustomTextCLIP`'s `TextTransformer` (`model.text`). Its blocks are
open_clip `ResidualAttentionBlock`s read with the pieces the image ViT uses; what is the
text's own is the causal mask and the pooled position (the end-of-text token, or the last).
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import ClipvizError
from .vit import OpenClipBlocks


class TextTower(OpenClipBlocks):
    """An open_clip text transformer with standard blocks and an additive `[L, L]` mask."""

    def __init__(self, model: Any, tokenizer: Any, name: str) -> None:
        from open_clip.transformer import ResidualAttentionBlock, TextTransformer

        text = getattr(model, "text", None)
        own = text is None and all(
            hasattr(model, a) for a in ("transformer", "token_embedding", "text_pool_type")
        )
        if not (own or isinstance(text, TextTransformer)):
            raise ClipvizError(
                f"{name}: its text tower ({type(text or model).__name__}) is not an open_clip text "
                "transformer, which clipviz reads token by token"
            )
        self._src = model if text is None else text
        self._name = name
        self.tokenizer = tokenizer
        self.pool_type = str(model.text_pool_type if text is None else text.pool_type)
        self._eos = getattr(self._src, "text_eos_id" if text is None else "eos_id", None)
        self._blocks = list(self._src.transformer.resblocks)
        self._batch_first = bool(getattr(self._src.transformer, "batch_first", True))
        self.explicit_attention = all(isinstance(b, ResidualAttentionBlock) for b in self._blocks)
        if (
            not self.explicit_attention
            or getattr(self._src, "cls_emb", None) is not None
            or getattr(self._src, "use_pad_mask", False)
            or self.pool_type not in ("argmax", "eos", "last", "first")
            or not hasattr(tokenizer, "decode")
        ):
            raise ClipvizError(
                f"{name}: its text tower (class token, padding mask, custom blocks or a "
                "tokenizer without `decode`) is not one clipviz reads token by token"
            )

    @property
    def depth(self) -> int:
        return len(self._blocks)

    @property
    def mask(self) -> torch.Tensor | None:
        """The additive attention mask `[L, L]` (causal), or None."""
        return getattr(self._src, "attn_mask", None)

    @property
    def causal(self) -> bool:
        """Whether the mask lets each position attend only to itself and the ones before it
        (its upper triangle is −inf), so that no position depends on a later one."""
        mask = self.mask
        if mask is None:
            return False
        upper = torch.ones(mask.shape, dtype=torch.bool, device=mask.device).triu(1)
        return bool(torch.isneginf(mask[upper]).all())

    def tokenize(self, prompt: str) -> torch.Tensor:
        """Token ids `[1, L]` of one prompt, exactly as given (no template)."""
        return self.tokenizer([prompt])

    def pooled_position(self, tokens: torch.Tensor) -> int:
        """The position whose output is the text embedding, for ids `[1, L]`."""
        if self.pool_type == "argmax":
            return int(tokens[0].argmax())
        if self.pool_type == "eos":
            matches = tokens[0] == int(self._eos or 0)
            return int(matches.int().argmax())
        return tokens.shape[1] - 1 if self.pool_type == "last" else 0

    def words(self, tokens: torch.Tensor, stop: int) -> list[str]:
        """The tokens of ids `[1, L]` at positions 1 … `stop`−1, as text (between the
        start-of-text token and the pooled end-of-text one)."""
        return [self.tokenizer.decode([int(t)]).strip() for t in tokens[0, 1:stop]]

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token plus positional embeddings `[B, L, W]`."""
        src = self._src
        x = src.token_embedding(tokens)
        return x + src.positional_embedding[: tokens.shape[1]].to(x.dtype)

    def run_block(self, i: int, x: torch.Tensor) -> torch.Tensor:
        block, mask = self._blocks[i], self.mask
        if self._batch_first:
            return block(x, attn_mask=mask)
        return block(x.transpose(0, 1), attn_mask=mask).transpose(0, 1)

    def run_blocks(self, x: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
        for i in range(start, self.depth if stop is None else stop):
            x = self.run_block(i, x)
        return x

    def pooled(self, x: torch.Tensor, position: int) -> torch.Tensor:
        """The text embedding `[B, D]` (not normalised) from last-block tokens `x`:
        `ln_final`, the token at `position`, the text projection."""
        src = self._src
        pooled = src.ln_final(x)[:, position]
        proj = src.text_projection
        if proj is None:
            return pooled
        return proj(pooled) if isinstance(proj, torch.nn.Linear) else pooled @ proj
