"""A tiny SigLIP trained from scratch on the synthetic world: timm's smallest ViT
(`test_vit`: 6 blocks of width 64, 2 heads) with a MAP head (an attention-pool probe, no
class token, no projection), a standard text tower, and SigLIP's pairwise sigmoid loss with
a learnt scale and bias. It sees the world's 64-px scenes at 128 px (its 16-px patches give
the same 8 × 8 grid as the tiny CLIP's 8-px patches at 64 px), so both explain the same
held-out images at the same resolution of their maps.

`ensure_tiny_siglip(cache_dir)` trains once (about two minutes on 2 CPU cores) and caches
the result as `tiny-synth-sigmoid.json` + `.safetensors`, loaded like any user's weights.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..eclip.losses import sigmoid_loss
from . import tinyclip, world
from .tinyclip import Progress, TinyClip, ensure_trained

# not "…siglip…": open_clip gives architectures so named its SigLIP tokenizer (a download)
NAME = "tiny-synth-sigmoid"
TINY_SIGLIP_CONFIG: dict[str, Any] = {
    "embed_dim": 64,
    "init_logit_scale": math.log(10),  # SigLIP's initialisation: t = 10, b = −10
    "init_logit_bias": -10,
    "vision_cfg": {
        "timm_model_name": "test_vit",
        "timm_model_pretrained": False,
        "timm_pool": "map",
        "timm_proj": "none",
        "image_size": 128,
    },
    "text_cfg": tinyclip.TINY_CLIP_CONFIG["text_cfg"],
}
DEFAULT_STEPS = 1000  # the sigmoid loss at batch 64 learns shape more slowly than InfoNCE


def build_model() -> Any:
    """An open_clip CLIP with the tiny SigLIP's random weights (seed torch first)."""
    import open_clip

    return open_clip.CLIP(**TINY_SIGLIP_CONFIG)


def model_images(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 `[B, 64, 64, 3]` scenes -> the model's input `[B, 3, 128, 128]` (bicubic, as
    the eval transform resizes them)."""
    size = TINY_SIGLIP_CONFIG["vision_cfg"]["image_size"]
    x = tinyclip.image_tensor(images)
    return F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)


def train_tiny_siglip(
    out_dir: str | os.PathLike[str],
    steps: int = DEFAULT_STEPS,
    seed: int = 0,
    batch_size: int = tinyclip.DEFAULT_BATCH,
    progress: Progress | None = None,
    pool_size: int | None = None,
) -> TinyClip:
    """Train the tiny SigLIP from scratch; write its config and weights to `out_dir`.
    seed: the world's (`world.World.from_seed`) and the training's; 0 is the test bed."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = build_model()

    def loss_of(image: torch.Tensor, text: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return sigmoid_loss(image, text, model.logit_scale.exp(), model.logit_bias, ids)

    tinyclip.fit(model, rng, steps, batch_size, pool_size or tinyclip.POOL_SIZE, 64,
                 model_images, loss_of, progress, no_decay="embed",
                 of=world.World.from_seed(seed))  # fmt: skip
    return tinyclip.save_trained(model, out_dir, NAME, TINY_SIGLIP_CONFIG)


def cache_key(steps: int = DEFAULT_STEPS, seed: int = 0) -> str:
    """Hash of everything the trained weights depend on: code, config, steps, seed."""
    h = hashlib.sha256()
    for text in (
        tinyclip.code_text(Path(__file__).read_text(encoding="utf-8")),
        tinyclip.code_text(Path(tinyclip.__file__).read_text(encoding="utf-8")),
        tinyclip.code_text(Path(world.__file__).read_text(encoding="utf-8")),
        tinyclip.code_text(inspect.getsource(sigmoid_loss)),
        json.dumps(TINY_SIGLIP_CONFIG, sort_keys=True),
        f"steps={steps} seed={seed}",
    ):
        h.update(text.encode("utf-8"))
    return h.hexdigest()[:16]


def ensure_tiny_siglip(
    cache_dir: str | os.PathLike[str],
    steps: int = DEFAULT_STEPS,
    seed: int = 0,
    progress: Progress | None = None,
) -> TinyClip:
    """The tiny SigLIP cached in `cache_dir/tinysiglip-<key>/`, trained there first if missing."""
    return ensure_trained(
        Path(cache_dir) / f"tinysiglip-{cache_key(steps, seed)}",
        NAME,
        lambda tmp: train_tiny_siglip(tmp, steps=steps, seed=seed, progress=progress),
    )
