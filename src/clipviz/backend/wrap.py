"""Models from elsewhere: Hugging Face `transformers` CLIP and SigLIP checkpoints
(`--model transformers:REPO_OR_DIR`), and models already loaded in a notebook
(`clipviz.from_open_clip`, `clipviz.from_transformers`)."""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path
from typing import Any

import torch

from ..errors import ClipvizError
from ..files import content_digest
from . import hub
from .base import Backend, Precision
from .preprocess import Crop

TRANSFORMERS = "transformers:"


def _weights_digest(model: Any) -> str:
    """A hash of a model's tensors' bytes (for models that have no file to hash)."""
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return "sha256:" + h.hexdigest()


def _hf_parts(model: Any, processor: Any) -> tuple[Any, Any, Any, Any, Any]:
    from .hf import HFModel, HFTokenizer

    kind = type(model).__name__
    if kind not in ("CLIPModel", "SiglipModel", "Siglip2Model"):
        raise ClipvizError(
            f"transformers {kind} is not supported; clipviz reads CLIPModel, SiglipModel and "
            "Siglip2Model"
        )
    ip = processor.image_processor
    if kind == "Siglip2Model":  # NaFlex: a square grid of the processor's patch budget
        side = int(ip.patch_size) * math.isqrt(int(ip.max_num_patches))
    else:
        size = getattr(ip, "crop_size", None) or getattr(ip, "size", None) or {}
        side = size.get("height") or size.get("shortest_edge") or 224
    positions = getattr(model.config.text_config, "max_position_embeddings", None)
    tokenizer = HFTokenizer(processor.tokenizer, siglip=kind != "CLIPModel", positions=positions)
    return HFModel(model), tokenizer, side, ip.image_mean, ip.image_std


def from_transformers(
    model: Any,
    processor: Any,
    device: str | None = None,
    precision: Precision = "auto",
    crop: Crop = "none",
    name: str | None = None,
) -> Backend:
    """Wrap a transformers `CLIPModel` or `SiglipModel` (with its processor) already loaded.

    >>> model = transformers.AutoModel.from_pretrained("google/siglip-base-patch16-224")
    >>> backend = clipviz.from_transformers(model, transformers.AutoProcessor.from_pretrained(...))
    """
    from .loading import assemble, resolve_device

    dev = resolve_device(device or str(next(model.parameters()).device))
    wrapped, tokenizer, side, mean, std = _hf_parts(model, processor)
    identity = {
        "model": name or f"transformers:{type(model).__name__}",
        "pretrained": None,
        "weights": _weights_digest(model),
        "weights_file": None,
        "config": None,
    }
    return assemble(wrapped, tokenizer, dev, side, mean, std, crop, identity, precision)


def load_transformers(
    spec: str,
    device: str = "auto",
    precision: Precision = "auto",
    resolution: int | None = None,
    crop: Crop = "none",
    text_cache: bool = True,
) -> Backend:
    """`transformers:REPO_OR_DIR`: a local folder written by `save_pretrained`, or a hub
    repository (from the local cache when offline; failing within seconds otherwise).
    Refused in one line where the folder, its config or its weights are wrong (`hf_load`)."""
    from . import hf_load
    from .loading import assemble, resolve_device

    try:
        from transformers import AutoConfig, AutoModel, AutoProcessor
    except ImportError:
        raise ClipvizError(
            "`model` transformers:… needs the transformers package: pip install 'clipviz[hf]'"
        ) from None
    source = spec[len(TRANSFORMERS) :]
    folder = hf_load.local_folder(spec, source)
    local = folder is not None
    offline = not local and not hub.hub_reachable(hub.hf_endpoint())
    dev = resolve_device(device)
    import transformers

    transformers.utils.logging.set_verbosity_error()  # the CLI reports problems itself
    transformers.utils.logging.disable_progress_bar()
    where = str(folder) if folder is not None else source

    def fetch(name: str) -> Path | None:
        if folder is not None:
            return folder / name if (folder / name).is_file() else None
        return hub.hub_file(source, name, offline)

    try:
        with hub.quiet_open_clip():
            config = AutoConfig.from_pretrained(where, local_files_only=local or offline)
            kind = getattr(config, "model_type", None)
            if kind not in ("clip", "siglip", "siglip2"):
                raise ClipvizError(
                    f"{spec} is a transformers {kind} model; clipviz reads CLIP, SigLIP and "
                    "SigLIP2 models (CLIPModel, SiglipModel, Siglip2Model)"
                )
            files = hf_load.weights_files(fetch, spec)
            hf_load.check_sizes(config, files, spec)
            model, info = AutoModel.from_pretrained(
                where, config=config, local_files_only=True, output_loading_info=True,
                ignore_mismatched_sizes=True,  # reported by `refuse_loading_report` instead
            )  # fmt: skip
            hf_load.refuse_loading_report(info, spec)
            processor = AutoProcessor.from_pretrained(where, local_files_only=local or offline)
    except ClipvizError:
        raise
    except Exception as e:  # noqa: BLE001 - transformers and the hub raise many types
        if offline:
            raise ClipvizError(hub.offline_message(spec)) from e
        raise ClipvizError(
            f"could not load {spec} ({type(e).__name__}: {str(e).splitlines()[0][:300]}); "
            "pass a folder written by save_pretrained or a transformers CLIP/SigLIP repository"
        ) from e
    wrapped, tokenizer, side, mean, std = _hf_parts(model, processor)
    found = files[0] if len(files) == 1 else None
    identity = {
        "model": spec if not local else f"{TRANSFORMERS}{os.path.abspath(where)}",
        "pretrained": None,
        "weights": "sha256:" + content_digest(found) if found else _weights_digest(model),
        "weights_file": str(found) if found else None,
        "config": None,
    }
    return assemble(
        wrapped, tokenizer, dev, side, mean, std, crop, identity, precision, resolution, text_cache
    )


def from_open_clip(
    model: Any,
    preprocess: Any,
    tokenizer: Any,
    device: str | None = None,
    precision: Precision = "auto",
    crop: Crop = "none",
    name: str | None = None,
) -> Backend:
    """Wrap an open_clip model already loaded (`open_clip.create_model_and_transforms`):
    its eval transform gives the input size, mean and std.

    >>> model, _, preprocess = open_clip.create_model_and_transforms("ViT-B-16", "openai")
    >>> backend = clipviz.from_open_clip(model, preprocess, open_clip.get_tokenizer("ViT-B-16"))
    """
    from torchvision import transforms

    from .loading import assemble, resolve_device

    steps = getattr(preprocess, "transforms", [preprocess])
    norm = next((t for t in steps if isinstance(t, transforms.Normalize)), None)
    if norm is None:
        raise ClipvizError("`preprocess` has no Normalize step; pass open_clip's eval transform")
    size = getattr(model.visual, "image_size", 224)
    dev = resolve_device(device or str(next(model.parameters()).device))
    identity = {
        "model": name or f"open_clip:{type(model.visual).__name__}",
        "pretrained": None,
        "weights": _weights_digest(model),
        "weights_file": None,
        "config": None,
    }
    return assemble(model, tokenizer, dev, size, norm.mean, norm.std, crop, identity, precision)
