"""ECLIP training options, their checks and the result of a run."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from ..backend import Backend
from ..backend.towers import TOKENS
from ..data.images import DEFAULT_MAX_PIXELS
from ..errors import ClipvizError
from .head import MaskRule, free_attention_mask
from .state import Dist


@dataclass(frozen=True)
class TrainConfig:
    """ECLIP training options.

    batch_size: the global contrastive batch of one micro-step, over all processes (the
        negatives of the loss); one optimizer step averages the gradients of `accum_steps`
        such micro-batches (more images per step, not more negatives).
    steps: optimizer steps in all; else `epochs` (default 1) passes over the data.
    """

    batch_size: int = 64
    accum_steps: int = 1
    epochs: int | None = None
    steps: int | None = None
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup: int = 0
    schedule: Literal["cosine", "constant"] = "cosine"
    mask_rule: MaskRule = "mean"
    mask_value: float | None = None
    train_ln_post: bool = False
    learnable_scale: bool = False
    distill: float = 0.0
    seed: int = 0
    # how the run is carried out, not what it computes (may change on --resume)
    workers: int = 0
    checkpoint_every: int = 500
    val_every: int | None = None
    log_every: int = 10
    max_pixels: int = DEFAULT_MAX_PIXELS


RUNTIME_FIELDS = frozenset({"workers", "checkpoint_every", "val_every", "log_every", "max_pixels"})
# epochs/steps are compared through the total step count they give
NOT_COMPARED = RUNTIME_FIELDS | {"epochs", "steps"}


@dataclass
class TrainResult:
    steps: int
    final: Path
    resumed_from: int
    last_loss: float | None
    val: dict[str, float] | None
    unreadable: int


def check_options(config: TrainConfig, backend: Backend, d: Dist, n: int) -> None:
    positive = {"batch_size": config.batch_size, "accum_steps": config.accum_steps,
                "checkpoint_every": config.checkpoint_every, "log_every": config.log_every}  # fmt: skip
    for name, value in positive.items():
        if value < 1:
            raise ClipvizError(f"--{name.replace('_', '-')} must be at least 1 (got {value})")
    if config.epochs is not None and config.steps is not None:
        raise ClipvizError("pass `epochs` or `steps`, not both")
    for name, count in (("epochs", config.epochs), ("steps", config.steps)):
        if count is not None and count < 1:
            raise ClipvizError(f"--{name} must be at least 1 (got {count})")
    if config.lr <= 0 or config.weight_decay < 0 or config.warmup < 0 or config.distill < 0:
        raise ClipvizError(
            "`lr` must be positive; `weight_decay`, `warmup`, `distill` not negative"
        )
    if config.batch_size % d.world:
        raise ClipvizError(
            f"`batch_size` {config.batch_size} (the global batch) is not divisible by the "
            f"{d.world} processes; use a multiple of {d.world}"
        )
    if "eclip" not in backend.vision.capabilities:
        raise ClipvizError(
            f"ECLIP needs free attention (a class token or an attention-pool probe reading "
            f"the patches); {backend.identity.get('model')}'s image tower ({backend.family}) "
            "has none (choose another `model`)"
        )
    if config.train_ln_post and not (
        backend.tower == TOKENS and backend.readout_vit.trains_post_norm
    ):
        raise ClipvizError(
            "`train_ln_post` applies to open_clip's own ViT towers only; train the explain "
            "projection alone"
        )
    free_attention_mask(torch.ones(1, 2), config.mask_rule, config.mask_value)  # checks the rule
    if n // config.batch_size // config.accum_steps == 0:
        raise ClipvizError(
            f"the training data has {n} usable pairs, fewer than one optimizer step "
            f"(`batch_size` {config.batch_size} × `accum_steps` {config.accum_steps}); "
            "lower them or add data"
        )
