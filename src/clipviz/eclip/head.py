"""ECLIP — Explainable CLIP with Masked Max Pooling (Li et al., "Exploring Visual
Interpretability for CLIP", 2022). The paper's code was never published; this is our
implementation of its description:

- the stock CLIP stays frozen; a trainable *explain projection* `P_e` (a copy of the
  tower's last linear map into the joint space: `proj` for open_clip ViTs, the head's
  projection for timm and transformers towers, the attention pool's `c_proj` for ResNets;
  the identity where the head ends in no linear map, as SigLIP's probe; optionally a copy of
  `ln_post` too) gives dense explain features `E = normalise(P_e(what that map reads at each
  patch))` — `ln_post(x_tokens)` for ViTs, the probe's value path for MAP heads, the
  attention pool's value path for ResNets — while the stock projection keeps serving
  recognition;
- *free attention*: the class token's attention over the patches in the last block (ViT,
  mean over heads), or the mean-token query's attention in the attention pool (RN) — it
  comes out of the same forward pass;
- mask `M`: positions whose free attention is at least its mean (or a top-k share, or a
  fixed threshold); masked max pooling `z = normalise(max_{n∈M} E[n])` per channel;
- training aligns `z` with the frozen text embeddings (see `clipviz.eclip.train`);
- the ECLIP map is ITSM on `E` (no mask).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..backend import Backend
from ..backend.towers import TOKENS
from ..errors import ClipvizError

MaskRule = Literal["mean", "topk", "threshold"]


@dataclass(frozen=True)
class FrozenFeatures:
    """What one frozen forward pass gives ECLIP.

    tokens: ViT last-block output `[B, 1+N, W]` (before `ln_post`); RN attention-pool
        inputs `[B, 1+N, C]` (mean token first).
    free_attention: `[B, N]`, the global query's attention over the positions (the class
        token's in the last block, the MAP probe's, or the ResNet pool's mean query's).
    stock_embedding: the stock global image embedding `[B, D]`, unit length.
    """

    tokens: torch.Tensor
    free_attention: torch.Tensor
    stock_embedding: torch.Tensor


def frozen_features(backend: Backend, images: torch.Tensor) -> FrozenFeatures:
    """Run the frozen tower once: tokens for the explain head, free attention, stock embedding."""
    with torch.no_grad(), backend.autocast():
        if backend.tower == TOKENS and backend.vit.readout == "latent":
            vit = backend.readout_vit  # a MAP probe reads the image: its attention is the free one
            x = vit.run_blocks(vit.embed(images))
            probs = vit.latent_probs(vit.pool_input(x))
            free = vit.patch_columns(probs).mean(dim=(1, 2))
            stock = vit.pooled(x)
        elif backend.tower == TOKENS:
            vit = backend.readout_vit
            last = vit.depth - 1
            x = vit.run_blocks(vit.embed(images), stop=last)
            x, probs = vit.block_with_attention(last, x)
            free = probs[:, :, 0, vit.prefix :].mean(dim=1)  # [B, N]
            stock = vit.pooled(x)
        else:
            rn = backend.rn
            x = rn.pool_inputs(rn.features(images))  # [B, 1+N, C]
            stock, probs = rn.mean_query_pool(x)  # the mean token's query
            free = probs[:, :, 0, rn.prefix :].mean(dim=1)  # [B, N]
    return FrozenFeatures(x.float(), free.float(), F.normalize(stock.float(), dim=-1))


class ExplainHead(nn.Module):
    """The trainable part of ECLIP: the explain projection (and optionally `ln_post`)."""

    _inputs: Callable[[torch.Tensor], torch.Tensor]
    _v_proj: nn.Module

    def __init__(self, backend: Backend, train_ln_post: bool = False) -> None:
        super().__init__()
        self.tower = backend.tower
        self.train_ln_post = train_ln_post
        self.bias: nn.Parameter | None = None
        if self.tower == TOKENS:
            vit = backend.readout_vit
            if train_ln_post and not vit.trains_post_norm:
                raise ClipvizError(
                    "`train_ln_post` applies to open_clip's own ViT towers only; train the "
                    "explain projection alone"
                )
            weight, bias = vit.explain_projection()  # the tower's last linear map, or identity
            self.proj = nn.Parameter(weight.detach().float().clone())  # [W', D]
            if bias is not None:
                self.bias = nn.Parameter(bias.detach().float().clone())
            self.ln_post = _copy_layernorm(vit.post_norm) if train_ln_post else None
            # frozen stock modules are used, not owned: kept out of parameters() and state_dict()
            object.__setattr__(self, "_inputs", vit.explain_inputs)
        else:
            rn = backend.rn
            out = rn.output_projection
            self.proj = nn.Parameter(out.weight.detach().float().clone().T)  # [C, D]
            self.bias = nn.Parameter(out.bias.detach().float().clone())
            object.__setattr__(self, "_v_proj", rn.value_projection)

    def features(self, tokens: torch.Tensor) -> torch.Tensor:
        """Dense explain features `E` `[B, N, D]`, unit length, from frozen `tokens`."""
        if self.tower == TOKENS:
            if self.ln_post is not None:  # open_clip ViT: one class token, then the patches
                e = self.ln_post(tokens[:, 1:]) @ self.proj
            else:
                e = self._inputs(tokens).float() @ self.proj
        else:
            e = self._v_proj(tokens[:, 1:]) @ self.proj
        if self.bias is not None:
            e = e + self.bias
        return F.normalize(e.float(), dim=-1)

    def trained_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors a checkpoint holds (names are stable across versions)."""
        return {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}


def _copy_layernorm(ln: nn.LayerNorm) -> nn.LayerNorm:
    copy = nn.LayerNorm(ln.normalized_shape, eps=ln.eps)
    copy.load_state_dict({k: v.detach().float().clone() for k, v in ln.state_dict().items()})
    return copy


def free_attention_mask(
    attention: torch.Tensor, rule: MaskRule = "mean", value: float | None = None
) -> torch.Tensor:
    """Confident foreground `[B, N]` from free attention `[B, N]`.

    mean: attention ≥ its mean over positions; topk: the `value` share of positions with the
    highest attention (at least one); threshold: attention ≥ `value`. Every image keeps at
    least its most attended position, so pooling is always defined.
    """
    if rule == "mean":
        mask = attention >= attention.mean(dim=-1, keepdim=True)
    elif rule == "topk":
        if value is None or not 0 < value <= 1:
            raise ClipvizError("mask rule topk needs a share in (0, 1], e.g. `mask_value` 0.3")
        k = max(1, round(value * attention.shape[-1]))
        kth = attention.topk(k, dim=-1).values[..., -1:]
        mask = attention >= kth
    elif rule == "threshold":
        if value is None:
            raise ClipvizError("mask rule threshold needs a value, e.g. `mask_value` 0.01")
        mask = attention >= value
    else:
        raise ClipvizError(f"unknown mask rule {rule!r}; use mean, topk or threshold")
    top = attention.argmax(dim=-1, keepdim=True)
    return mask.scatter(-1, top, True)


def masked_max_pool(features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`normalise(max_{n ∈ mask} E[n, :])` per channel: `[B, N, D]`, `[B, N]` -> `[B, D]`."""
    masked = features.masked_fill(~mask[..., None], float("-inf"))
    return F.normalize(masked.max(dim=1).values, dim=-1)


# -- checkpoints --------------------------------------------------------------------------


def base_identity(backend: Backend) -> dict[str, Any]:
    """What a checkpoint must match: the base model's architecture and weights."""
    return {k: backend.identity[k] for k in ("model", "pretrained", "weights", "config")}


def load_head(backend: Backend, path: str | Path) -> ExplainHead:
    """An `ExplainHead` from an ECLIP checkpoint; refuses one made for another base model."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ClipvizError(f"`checkpoint` {path}: no such file; train one with `clipviz train`")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            names = [k for k in f.keys() if k.startswith("head.")]  # noqa: SIM118
            tensors = {k[len("head.") :]: f.get_tensor(k) for k in names}
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for bad files
        raise ClipvizError(
            f"`checkpoint` {path} is not a readable safetensors checkpoint ({e}); pass the "
            "RUN/eclip.safetensors that `clipviz train` wrote"
        ) from e
    if "base" not in meta:
        raise ClipvizError(
            f"`checkpoint` {path} has no base-model identity, so it is not an ECLIP checkpoint; "
            "pass the RUN/eclip.safetensors that `clipviz train` wrote"
        )
    base = json.loads(meta["base"])
    mine = base_identity(backend)
    if base != mine:
        raise ClipvizError(
            f"`checkpoint` {path} was trained for {describe_identity(base)}, but the loaded model is "
            f"{describe_identity(mine)}; pass the same `model`/`pretrained` as in training"
        )
    if bad := [k for k, t in tensors.items() if t.is_floating_point() and not t.isfinite().all()]:
        raise ClipvizError(
            f"`checkpoint` {path} holds non-finite values (NaN or inf) in {', '.join(bad)}; "
            "the training diverged — train again (e.g. with a lower `lr`)"
        )
    config = json.loads(meta.get("config", "{}"))
    head = ExplainHead(backend, train_ln_post=bool(config.get("train_ln_post", False)))
    try:
        head.load_state_dict(tensors)
    except RuntimeError as e:
        raise ClipvizError(
            f"`checkpoint` {path} does not fit this model: {str(e).splitlines()[0]}; it is "
            "damaged or from another clipviz version — train it again with `clipviz train`"
        ) from e
    return head.to(backend.device).eval()


def describe_identity(identity: dict[str, Any]) -> str:
    weights = identity.get("pretrained") or identity.get("weights")
    return f"{identity.get('model')} ({weights})"
