"""Loading CLIP models: open_clip tags, `hf-hub:`, `local-dir:` and local weight files.

Weights are only ever read safely (safetensors, or `torch.load(weights_only=True)` inside
open_clip), identified by the hash of their content, and refused when not finite.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import torch

from ..errors import ClipvizError
from ..files import cache_root, content_digest
from . import hub
from .base import Backend, Precision
from .preprocess import Crop, Preprocess
from .text import TextCache

DEFAULT_MODEL = "ViT-B-16"
DEFAULT_PRETRAINED = "openai"
RANDOM_WEIGHTS = "random"
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
MAX_RESOLUTION = 4096
LOCAL_DIR_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


def resolve_device(device: str = "auto") -> torch.device:
    """`auto` picks CUDA, then MPS, then CPU; an unavailable explicit choice is an error."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ClipvizError(
            "`device` cuda was asked for but no CUDA GPU is visible; use `device` cpu"
        )
    if device == "mps" and not (
        getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()
    ):
        raise ClipvizError("`device` mps was asked for but MPS is not available; use `device` cpu")
    try:
        return torch.device(device)
    except RuntimeError as e:
        raise ClipvizError(f"unknown `device` {device!r}; use auto, cpu, cuda or mps") from e


def _autocast_dtype(device: torch.device, precision: Precision) -> torch.dtype | None:
    if precision == "fp32" or device.type != "cuda":
        if precision in ("bf16", "fp16") and device.type != "cuda":
            raise ClipvizError(f"`precision` {precision} needs a CUDA device; use `precision` fp32")
        return None
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if precision == "bf16" else torch.float16


def register_model_config(path: str | os.PathLike[str]) -> str:
    """Register a custom architecture JSON with open_clip; returns its name (the file's stem)."""
    import open_clip

    p = Path(path)
    if not p.is_file():
        raise ClipvizError(f"`model_config` {p}: no such file; pass an open_clip model config JSON")
    try:
        cfg = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ClipvizError(
            f"`model_config` {p} is not valid UTF-8 JSON ({e}); fix the file, or save it as a "
            "UTF-8 JSON object: an open_clip model config"
        ) from e
    if not isinstance(cfg, dict) or "vision_cfg" not in cfg or "text_cfg" not in cfg:
        raise ClipvizError(
            f"`model_config` {p} is not an open_clip model config "
            "(needs embed_dim, vision_cfg and text_cfg)"
        )
    for section, key, low in (("text_cfg", "context_length", 2), ("vision_cfg", "image_size", 1)):
        value = cfg[section].get(key, low) if isinstance(cfg[section], dict) else None
        values = value if isinstance(value, list) else [value]
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= low for v in values):
            raise ClipvizError(
                f"`model_config` {p}: {section}.{key} is {value!r}; it must be an integer "
                f"of at least {low}"
            )
    embed_dim = cfg.get("embed_dim")
    if not isinstance(embed_dim, int) or embed_dim < 1:
        raise ClipvizError(
            f"`model_config` {p}: embed_dim is {embed_dim!r}; use a positive integer"
        )
    open_clip.add_model_config(p)
    return p.stem


def _default_pretrained(model: str) -> str:
    import open_clip

    tags = open_clip.list_pretrained_tags_by_model(model)
    if DEFAULT_PRETRAINED in tags:
        return DEFAULT_PRETRAINED
    if tags:
        return tags[0]
    raise ClipvizError(
        f"model {model!r} has no known pretrained weights; pass `pretrained` FILE "
        f"(or `pretrained` {RANDOM_WEIGHTS} for random weights)"
    )


def _unknown_model_message(model: str) -> str:
    import difflib

    import open_clip

    close = difflib.get_close_matches(model, open_clip.list_models(), n=4, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    return (
        f"unknown model {model!r}: not an open_clip architecture.{hint} "
        "See `clipviz models`, or pass `model_config` FILE.json for a custom one"
    )


def load_backend(
    model: str | None = None,
    pretrained: str | None = None,
    model_config: str | os.PathLike[str] | None = None,
    device: str = "auto",
    precision: Precision = "auto",
    resolution: int | None = None,
    crop: Crop = "none",
    text_cache: bool = True,
    compile: bool = False,
    channels_last: bool | None = None,
) -> Backend:
    """Load a CLIP model and wrap it in a `Backend`.

    model: open_clip architecture name, `hf-hub:org/repo`, `local-dir:PATH`, or
        `transformers:REPO_OR_DIR` (a transformers CLIPModel or SiglipModel); defaults to the
        `--model-config` file's stem, else ViT-B-16.
    pretrained: open_clip tag (`openai`, `laion2b_s34b_b88k`, …), a weights file, or `random`;
        defaults to `openai` where the architecture has it.
    resolution: run the image tower at this input size (positions interpolated on the fly).
    compile, channels_last: speed options for the image tower (`speed.accelerate`).
    """
    from .speed import accelerate

    backend = _load_backend(
        model, pretrained, model_config, device, precision, resolution, crop, text_cache
    )
    return accelerate(backend, compile, channels_last)


def _load_backend(
    model: str | None,
    pretrained: str | None,
    model_config: str | os.PathLike[str] | None,
    device: str,
    precision: Precision,
    resolution: int | None,
    crop: Crop,
    text_cache: bool,
) -> Backend:
    import open_clip
    from open_clip.factory import parse_model_name

    if model is not None and model.startswith("transformers:"):
        if pretrained or model_config:
            raise ClipvizError(
                "`pretrained` and `model_config` do not apply to a transformers: model"
            )
        from .wrap import load_transformers

        return load_transformers(model, device, precision, resolution, crop, text_cache)
    config_text = None
    if model_config is not None:
        stem = register_model_config(model_config)
        config_text = Path(model_config).read_text(encoding="utf-8")
        model = model or stem
    model = model or DEFAULT_MODEL
    dev = resolve_device(device)
    schema, identifier = parse_model_name(model)
    weights_id: str | None = None
    weights_file: str | None = None
    preprocess_cfg: dict[str, Any] = {}
    kwargs: dict[str, Any] = {}

    if schema == "local-dir":
        if pretrained:
            raise ClipvizError("`pretrained` cannot be combined with a local-dir: model")
        weights_id = _local_dir_identity(Path(identifier))
        name = model
    elif schema == "hf-hub":
        if pretrained:
            raise ClipvizError("`pretrained` cannot be combined with an hf-hub: model")
        name, weights_id = model, model
        if not hub.hub_reachable(hub.hf_endpoint()):
            local = hub.hf_hub_local_dir(identifier)
            if local is None:
                raise ClipvizError(hub.offline_message(model))
            name = f"local-dir:{local}"
    else:
        name = identifier.replace("/", "-")
        if open_clip.get_model_config(name) is None:
            raise ClipvizError(_unknown_model_message(identifier))
        pretrained = pretrained or _default_pretrained(name)
        if pretrained == RANDOM_WEIGHTS:
            weights_id = RANDOM_WEIGHTS
        elif (tag_cfg := open_clip.get_pretrained_cfg(name, pretrained)) and not Path(
            pretrained
        ).is_file():
            kwargs["pretrained"] = hub.tag_weights_file(name, pretrained, tag_cfg)
            kwargs["force_quick_gelu"] = bool(tag_cfg.get("quick_gelu", False))
            preprocess_cfg = {k: tag_cfg[k] for k in ("mean", "std") if k in tag_cfg}
            weights_id = pretrained
        else:
            path = Path(pretrained).expanduser()
            if not path.is_file():
                tags = open_clip.list_pretrained_tags_by_model(name)
                raise ClipvizError(
                    f"`pretrained` {pretrained!r} is neither a weights file nor a tag of {name} "
                    f"(tags: {', '.join(tags) or 'none'})"
                )
            if path.suffix.lower() not in WEIGHT_SUFFIXES:
                raise ClipvizError(
                    f"`pretrained` {path}: unsupported weights file; use "
                    + "/".join(WEIGHT_SUFFIXES)
                )
            kwargs["pretrained"] = str(path)
            weights_id = "sha256:" + content_digest(path)
            weights_file = str(path)

    try:
        with hub.quiet_open_clip():
            clip = open_clip.create_model(name, device="cpu", weights_only=True, **kwargs)
            tokenizer = open_clip.get_tokenizer(name)
    except ClipvizError:
        raise
    except Exception as e:  # noqa: BLE001 - open_clip raises bare RuntimeError/ValueError
        raise ClipvizError(_load_error(model, str(kwargs.get("pretrained") or model), e)) from e
    if weights_id == RANDOM_WEIGHTS:
        _fill_uninitialised(clip)
    visual_cfg = getattr(clip.visual, "preprocess_cfg", {}) or {}
    mean = tuple(preprocess_cfg.get("mean", visual_cfg.get("mean", open_clip.OPENAI_DATASET_MEAN)))
    std = tuple(preprocess_cfg.get("std", visual_cfg.get("std", open_clip.OPENAI_DATASET_STD)))
    size = getattr(clip.visual, "image_size", 224)
    identity = {
        "model": model,
        # a weights file is identified by its bytes ("weights"), not by where it lies
        "pretrained": None if weights_file or schema is not None else pretrained,
        "weights": weights_id,
        "weights_file": weights_file,
        "config": hashlib.sha1(config_text.encode()).hexdigest()[:16] if config_text else None,
    }
    return assemble(
        clip, tokenizer, dev, size, mean, std, crop, identity, precision, resolution, text_cache
    )


def _load_error(model: str, weights: str, e: Exception) -> str:
    """One line on why open_clip could not load `weights`: pickled objects, or the tensors
    the model misses, does not expect or has in another shape (a few of each, by name)."""
    import pickle

    from .hf_load import pickled_message

    text = str(e)
    if isinstance(e, pickle.UnpicklingError) or "Weights only load failed" in text:
        return pickled_message(weights)
    if "Error(s) in loading state_dict" in text:
        problems = []
        for label, what in (("Missing key(s)", "missing"), ("Unexpected key(s)", "unexpected")):
            found = re.search(re.escape(label) + r" in state_dict: (.*?)\.?\s*(?:\n|$)", text)
            names = re.findall(r'"([^"]+)"', found.group(1)) if found else []
            if names:
                shown = ", ".join(names[:3]) + (
                    f" and {len(names) - 3} more" if len(names) > 3 else ""
                )
                problems.append(
                    f"{what} {len(names)} tensor{'s' if len(names) > 1 else ''}: {shown}"
                )
        shapes = re.findall(r"size mismatch for ([^:]+): copying a param with shape "
                            r"torch\.Size\((\[[^]]*\])\) from checkpoint, the shape in current "
                            r"model is torch\.Size\((\[[^]]*\])\)", text)  # fmt: skip
        if shapes:
            problems.append("misshapen " + "; ".join(
                f"{n} is {a} in the weights, {b} in the model" for n, a, b in shapes[:3]))  # fmt: skip
        if problems:
            return (
                f"weights {weights} do not match {model} ({'; '.join(problems)}); check that "
                "`model` (or `model_config`) matches the weights"
            )
    return (
        f"could not load {model} with weights {weights}: {text.splitlines()[0][:300] if text else type(e).__name__} — "
        "check that `model` (or `model_config`) matches the weights"
    )


def assemble(
    model: Any,
    tokenizer: Any,
    device: torch.device,
    size: int | tuple[int, int],
    mean: Any,
    std: Any,
    crop: Crop,
    identity: dict[str, Any],
    precision: Precision = "auto",
    resolution: int | None = None,
    text_cache: bool = True,
) -> Backend:
    """A `Backend` around a loaded model (open_clip's, or a wrapped transformers one):
    frozen, on `device`, refused if its weights are not finite or its tower unsupported."""
    model = model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    _refuse_non_finite(model, str(identity.get("weights_file") or identity.get("model")))
    hw: tuple[int, int] = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if resolution is not None:
        if not 32 <= resolution <= MAX_RESOLUTION:
            raise ClipvizError(
                f"`resolution` {resolution} is outside 32…{MAX_RESOLUTION}; use e.g. 224 or 448"
            )
        hw = (resolution, resolution)
    backend = Backend(
        model=model,
        tokenizer=tokenizer,
        device=device,
        preprocess=Preprocess(hw, tuple(mean), tuple(std), crop),
        identity={**identity, "resolution": hw[0]},
        autocast_dtype=_autocast_dtype(device, precision),
    )
    if text_cache:
        backend.text_cache = TextCache(cache_root() / "text" / backend.key)
    # refuse unsupported towers and input sizes at load time, not mid-run
    backend.vision.check_size(hw)
    return backend


def _local_dir_identity(folder: Path) -> str:
    """The content hash of a `local-dir:` model (its config and weights files)."""
    config = folder / "open_clip_config.json"
    weights = [folder / n for n in LOCAL_DIR_WEIGHTS if (folder / n).is_file()]
    if not config.is_file() or not weights:
        raise ClipvizError(
            f"local-dir:{folder} needs open_clip_config.json and {LOCAL_DIR_WEIGHTS[0]} "
            f"(or {LOCAL_DIR_WEIGHTS[1]}) in that folder"
        )
    return (
        "sha256:"
        + hashlib.sha256((content_digest(config) + content_digest(weights[0])).encode()).hexdigest()
    )


def _fill_uninitialised(model: Any) -> None:
    """open_clip leaves a few tensors of a fresh model as `torch.empty` (CoCa's decoder
    `text_projection`): give any that hold NaN or infinity seeded normal values (std 0.02),
    so `random` weights are always finite."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                tensor.copy_(0.02 * torch.randn(tensor.shape, generator=g))


def _refuse_non_finite(model: Any, source: str) -> None:
    """Weights with NaN or infinity give NaN scores that look like results: refuse them."""
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ClipvizError(
                f"weights {source} hold non-finite values (NaN or inf) in {name}; "
                "the file is corrupt or the training diverged — use other weights"
            )
