"""ECLIP's map: ITSM on the explain features of a head trained by `clipviz train` (the head,
its checkpoints and its training are in `clipviz.eclip`)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..backend import Backend, Texts
from ..backend.towers import RESNET, TOKENS
from ..eclip.head import frozen_features, load_head
from ..errors import ClipvizError
from .kernels import similarity_maps
from .registry import MapResult, register


@register(
    "eclip",
    towers=(TOKENS, RESNET),
    needs={TOKENS: ("eclip",), RESNET: ("eclip",)},
    summary="ITSM on the explain projection trained by `clipviz train` (masked max pooling)",
    citation="Li et al., Exploring Visual Interpretability for CLIP (ECLIP), arXiv:2209.07046, "
    "2022 — our implementation",
    reference="the paper's description (its code was never published); clipviz.eclip",
    defaults="ITSM on the explain projection trained by `clipviz train` (masked max pooling guided "
    "by free attention; SigLIP models with their sigmoid loss); needs `--eclip CKPT`",
)
def eclip(
    backend: Backend, images: torch.Tensor, texts: Texts, checkpoint: str | None = None
) -> MapResult:
    """ECLIP map: ITSM on the explain features `E` (no mask).

    checkpoint: an ECLIP checkpoint from `clipviz train` (RUN_DIR/eclip.safetensors).
    """
    if checkpoint is None:
        raise ClipvizError(
            "method eclip needs a checkpoint: `checkpoint` RUN_DIR/eclip.safetensors"
        )
    path = Path(checkpoint).expanduser()
    try:
        st = path.stat()
        stamp = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
    except OSError:
        stamp = (str(path), 0, 0)  # load_head reports the missing file
    head = backend.memo(("eclip-head", stamp), lambda: load_head(backend, path))
    feats = frozen_features(backend, images)
    with torch.no_grad():
        e = head.features(feats.tokens)  # [B, N, D]
    maps = similarity_maps(e, texts.embeddings.float(), backend.grid_size(images))
    return MapResult(maps, image_embeddings=feats.stock_embedding)
