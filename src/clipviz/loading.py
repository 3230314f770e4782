"""Loading CLIP models: open_clip tags, `hf-hub:`, `local-dir:` and local weight files.

Weights are only ever read safely (safetensors, or `torch.load(weights_only=True)` inside
open_clip). Without network, loading fails within seconds with one clear message instead
of waiting on the hub client's retries.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch

from .backend import Backend, Crop, Precision, Preprocess
from .errors import ClipvizError
from .files import cache_root

DEFAULT_MODEL = "ViT-B-16"
DEFAULT_PRETRAINED = "openai"
RANDOM_WEIGHTS = "random"
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
HUB_PROBE_SECONDS = 3.0


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
            "--device cuda was asked for but no CUDA GPU is visible; use --device cpu"
        )
    if device == "mps" and not (
        getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()
    ):
        raise ClipvizError("--device mps was asked for but MPS is not available; use --device cpu")
    try:
        return torch.device(device)
    except RuntimeError as e:
        raise ClipvizError(f"unknown --device {device!r}; use auto, cpu, cuda or mps") from e


def _autocast_dtype(device: torch.device, precision: Precision) -> torch.dtype | None:
    if precision == "fp32" or device.type != "cuda":
        if precision in ("bf16", "fp16") and device.type != "cuda":
            raise ClipvizError(f"--precision {precision} needs a CUDA device; use --precision fp32")
        return None
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if precision == "bf16" else torch.float16


@contextlib.contextmanager
def _quiet_open_clip() -> Iterator[None]:
    """open_clip logs warnings on the root logger; the CLI reports problems itself."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def _hub_reachable(url: str) -> bool:
    """True if a TCP connection to `url`'s host opens within a few seconds.

    Runs in a thread so a hanging DNS lookup cannot stall start-up.
    """
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    parsed = urlparse(url)
    host = parsed.hostname or "huggingface.co"
    port = parsed.port or (443 if parsed.scheme != "http" else 80)
    result = [False]

    def probe() -> None:
        import socket

        try:
            socket.create_connection((host, port), timeout=HUB_PROBE_SECONDS).close()
            result[0] = True
        except OSError:
            pass

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(HUB_PROBE_SECONDS + 0.5)
    return result[0]


def _hf_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co")


def _cached_hf_file(repo_id: str, filenames: Sequence[str]) -> str | None:
    from huggingface_hub import hf_hub_download

    for name in filenames:
        try:
            return str(hf_hub_download(repo_id=repo_id, filename=name, local_files_only=True))
        except Exception:  # noqa: BLE001 - any lookup failure means "not cached"
            continue
    return None


def _offline_message(what: str) -> str:
    return (
        f"no cached weights for {what} and the model hub cannot be reached (offline); "
        "run once with network to download them, or pass a local file with "
        "--pretrained PATH (.safetensors/.pt/.bin)"
    )


def _tag_weights_file(model: str, tag: str, cfg: dict[str, Any]) -> str:
    """Path of the weights for an open_clip tag: the local cache, else a download."""
    from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME
    from open_clip.pretrained import download_pretrained

    if "file" in cfg:
        return str(cfg["file"])
    hub = cfg.get("hf_hub", "")
    if hub:
        repo_id, filename = os.path.split(hub)
        filename = filename or HF_WEIGHTS_NAME
        names = [HF_SAFE_WEIGHTS_NAME] if filename == HF_WEIGHTS_NAME else []
        if filename.endswith((".bin", ".pth")):
            names.append(filename[:-4] + ".safetensors")
        names.append(filename)
        if cached := _cached_hf_file(repo_id, names):
            return cached
        reachable = _hub_reachable(_hf_endpoint())
    else:
        url = cfg.get("url", "")
        cached_url = Path("~/.cache/clip").expanduser() / os.path.basename(urlparse(url).path)
        if cached_url.is_file():
            return str(cached_url)
        reachable = _hub_reachable(url)
    if not reachable:
        raise ClipvizError(_offline_message(f"{model}/{tag}"))
    try:
        with _quiet_open_clip():
            return str(download_pretrained(cfg))
    except Exception as e:  # noqa: BLE001 - network and hub errors come in many types
        raise ClipvizError(
            f"could not download weights for {model}/{tag} ({type(e).__name__}: {e}); "
            "pass a local file with --pretrained PATH"
        ) from e


def _hf_hub_local_dir(repo_id: str) -> str | None:
    """The cached snapshot folder of an open_clip hub repo, if config and weights are cached."""
    from open_clip.constants import HF_CONFIG_NAME, HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

    config = _cached_hf_file(repo_id, [HF_CONFIG_NAME])
    weights = _cached_hf_file(repo_id, [HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME])
    if config and weights and Path(config).parent == Path(weights).parent:
        return str(Path(config).parent)
    return None


def _file_identity(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"


def register_model_config(path: str | os.PathLike[str]) -> str:
    """Register a custom architecture JSON with open_clip; returns its name (the file's stem)."""
    import open_clip

    p = Path(path)
    if not p.is_file():
        raise ClipvizError(f"--model-config {p}: no such file; pass an open_clip model config JSON")
    try:
        cfg = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ClipvizError(f"--model-config {p} is not valid JSON ({e})") from e
    if not isinstance(cfg, dict) or "vision_cfg" not in cfg or "text_cfg" not in cfg:
        raise ClipvizError(
            f"--model-config {p} is not an open_clip model config "
            "(needs embed_dim, vision_cfg and text_cfg)"
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
        f"model {model!r} has no known pretrained weights; pass --pretrained FILE "
        f"(or --pretrained {RANDOM_WEIGHTS} for random weights)"
    )


def _unknown_model_message(model: str) -> str:
    import difflib

    import open_clip

    close = difflib.get_close_matches(model, open_clip.list_models(), n=4, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    return (
        f"unknown model {model!r}: not an open_clip architecture.{hint} "
        "See `clipviz models`, or pass --model-config FILE.json for a custom one"
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
) -> Backend:
    """Load a CLIP model and wrap it in a `Backend`.

    model: open_clip architecture name, `hf-hub:org/repo` or `local-dir:PATH`; defaults to the
        `--model-config` file's stem, else ViT-B-16.
    pretrained: open_clip tag (`openai`, `laion2b_s34b_b88k`, …), a weights file, or `random`;
        defaults to `openai` where the architecture has it.
    resolution: run the image tower at this input size (positions interpolated on the fly).
    """
    import open_clip
    from open_clip.factory import parse_model_name

    config_text = None
    if model_config is not None:
        stem = register_model_config(model_config)
        config_text = Path(model_config).read_text(encoding="utf-8")
        model = model or stem
    model = model or DEFAULT_MODEL
    dev = resolve_device(device)
    schema, identifier = parse_model_name(model)
    weights_id: str | None = None
    preprocess_cfg: dict[str, Any] = {}
    kwargs: dict[str, Any] = {}

    if schema == "local-dir":
        if pretrained:
            raise ClipvizError("--pretrained cannot be combined with a local-dir: model")
        if not (Path(identifier) / "open_clip_config.json").is_file():
            raise ClipvizError(
                f"local-dir:{identifier} needs open_clip_config.json and weights in that folder"
            )
        name, weights_id = model, _file_identity(Path(identifier) / "open_clip_config.json")
    elif schema == "hf-hub":
        if pretrained:
            raise ClipvizError("--pretrained cannot be combined with an hf-hub: model")
        name, weights_id = model, model
        if not _hub_reachable(_hf_endpoint()):
            local = _hf_hub_local_dir(identifier)
            if local is None:
                raise ClipvizError(_offline_message(model))
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
            kwargs["pretrained"] = _tag_weights_file(name, pretrained, tag_cfg)
            kwargs["force_quick_gelu"] = bool(tag_cfg.get("quick_gelu", False))
            preprocess_cfg = {k: tag_cfg[k] for k in ("mean", "std") if k in tag_cfg}
            weights_id = pretrained
        else:
            path = Path(pretrained).expanduser()
            if not path.is_file():
                tags = open_clip.list_pretrained_tags_by_model(name)
                raise ClipvizError(
                    f"--pretrained {pretrained!r} is neither a weights file nor a tag of {name} "
                    f"(tags: {', '.join(tags) or 'none'})"
                )
            if path.suffix.lower() not in WEIGHT_SUFFIXES:
                raise ClipvizError(
                    f"--pretrained {path}: unsupported weights file; use "
                    + "/".join(WEIGHT_SUFFIXES)
                )
            kwargs["pretrained"] = str(path)
            weights_id = _file_identity(path)

    try:
        with _quiet_open_clip():
            clip = open_clip.create_model(name, device="cpu", weights_only=True, **kwargs)
            tokenizer = open_clip.get_tokenizer(name)
    except ClipvizError:
        raise
    except Exception as e:  # noqa: BLE001 - open_clip raises bare RuntimeError/ValueError
        where = kwargs.get("pretrained") or model
        raise ClipvizError(
            f"could not load {model} with weights {where}: {str(e).splitlines()[0][:300]} — "
            "check that --model (or --model-config) matches the weights"
        ) from e
    clip = clip.to(dev).eval()
    for p in clip.parameters():
        p.requires_grad_(False)

    visual_cfg = getattr(clip.visual, "preprocess_cfg", {}) or {}
    mean = tuple(preprocess_cfg.get("mean", visual_cfg.get("mean", open_clip.OPENAI_DATASET_MEAN)))
    std = tuple(preprocess_cfg.get("std", visual_cfg.get("std", open_clip.OPENAI_DATASET_STD)))
    size = getattr(clip.visual, "image_size", 224)
    size = (size, size) if isinstance(size, int) else tuple(size)
    if resolution is not None:
        if resolution < 32:
            raise ClipvizError(f"--resolution {resolution} is too small; use e.g. 224 or 448")
        size = (resolution, resolution)
    identity = {
        "model": model,
        "pretrained": pretrained if schema is None else None,
        "weights": weights_id,
        "config": hashlib.sha1(config_text.encode()).hexdigest()[:16] if config_text else None,
        "resolution": size[0],
    }
    backend = Backend(
        model=clip,
        tokenizer=tokenizer,
        device=dev,
        preprocess=Preprocess(size, mean, std, crop),  # type: ignore[arg-type]
        identity=identity,
        autocast_dtype=_autocast_dtype(dev, precision),
        text_cache_dir=cache_root() / "text" if text_cache else None,
    )
    _ = backend.tower  # refuse unsupported towers at load time, not mid-run
    if backend.tower == "vit":
        backend._check_input(torch.empty(1, 3, *size))
    elif size[0] % 32 or size[1] % 32:
        raise ClipvizError(f"--resolution {size[0]} must be a multiple of 32 for a ResNet tower")
    return backend


def cached_tags() -> set[tuple[str, str]]:
    """(model, tag) pairs of open_clip weights present in the local hub or URL caches."""
    import open_clip

    repos: set[str] = set()
    try:
        from huggingface_hub import scan_cache_dir

        repos = {r.repo_id for r in scan_cache_dir().repos if r.repo_type == "model"}
    except Exception:  # noqa: BLE001 - no cache dir yet, or an unreadable one
        pass
    url_cache = Path("~/.cache/clip").expanduser()
    found = set()
    for name, tag in open_clip.list_pretrained(as_str=False):
        cfg = open_clip.get_pretrained_cfg(name, tag)
        hub = cfg.get("hf_hub", "")
        url = cfg.get("url", "")
        if (
            hub
            and os.path.split(hub)[0] in repos
            or url
            and (url_cache / os.path.basename(urlparse(url).path)).is_file()
        ):
            found.add((name, tag))
    return found
