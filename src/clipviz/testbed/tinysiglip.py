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
from ..files import atomic_path, write_json_atomic
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
    """Train the tiny SigLIP from scratch; write its config and weights to `out_dir`."""
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    pool_size = pool_size or tinyclip.POOL_SIZE
    model = build_model()
    model.token_embedding.weight.requires_grad_(False)  # as the tiny CLIP: ~40 rows are used
    images, caption_ids, captions = tinyclip.training_pool(rng, pool_size, 64)
    caption_tokens = tinyclip.tokenizer()(captions)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in params if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in params if not (p.ndim >= 2 and "embed" not in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": tinyclip.WEIGHT_DECAY},
         {"params": no_decay, "weight_decay": 0}],
        lr=tinyclip.LR, betas=(0.9, 0.98),
    )  # fmt: skip
    model.train()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = tinyclip.learning_rate(step, steps)
        idx = torch.from_numpy(rng.integers(0, pool_size, batch_size))
        flip = torch.from_numpy(rng.random(batch_size) < 0.5).view(-1, 1, 1, 1)
        x = torch.where(flip, images[idx].flip(2), images[idx])
        unique, ids = torch.unique(caption_ids[idx], return_inverse=True)
        image_emb = model.encode_image(model_images(x), normalize=True)
        text_emb = model.encode_text(caption_tokens[unique], normalize=True)[ids]
        loss = sigmoid_loss(image_emb, text_emb, model.logit_scale.exp(), model.logit_bias, ids)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(tinyclip.MAX_LOGIT_SCALE))
        if progress is not None:
            progress(step + 1, steps, loss.item())

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config_path, weights_path = out / f"{NAME}.json", out / f"{NAME}.safetensors"
    write_json_atomic(config_path, TINY_SIGLIP_CONFIG)
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    with atomic_path(weights_path) as tmp:
        save_file(state, str(tmp))
    return TinyClip(config_path, weights_path)


def cache_key(steps: int = DEFAULT_STEPS, seed: int = 0) -> str:
    """Hash of everything the trained weights depend on: code, config, steps, seed."""
    h = hashlib.sha256()
    for text in (
        Path(__file__).read_text(encoding="utf-8"),
        Path(tinyclip.__file__).read_text(encoding="utf-8"),
        Path(world.__file__).read_text(encoding="utf-8"),
        inspect.getsource(sigmoid_loss),
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
