"""Proxy models: a vision foundation model (DINO, DINOv2, …) read for its patch features or its
last block's attention, built with timm, for the segmentation methods that borrow another
model's notion of which patches belong together (ProxyCLIP, CASS).

A proxy is named by a spec:

- a timm model name with a pretrained tag, `vit_base_patch8_224.dino`: its weights from the
  model hub's local cache (downloaded when the hub can be reached);
- `NAME=FILE`: that architecture with the weights of a local `.safetensors` (or `.pth`/`.bin`,
  read with `torch.load(weights_only=True)`) file, e.g. the official DINO checkpoint;
- a folder as the hub gives it (`config.json` naming the `architecture`, optionally
  `model_args` and `pretrained_cfg`, next to `model.safetensors`), or a weights file inside it.

Weights are never unpickled. Positions are interpolated to other input sizes as the DINO and
DINOv2 repositories do (bicubic, the grid plus 0.1 as the scale), not as timm does.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..backend import hub
from ..errors import ClipvizError

DEFAULT_PROXY = "vit_base_patch8_224.dino"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
_IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def dino_positions(
    patch_pos: torch.Tensor, src: tuple[int, int], grid: tuple[int, int]
) -> torch.Tensor:
    """Patch position embeddings `[N, C]` laid out on `src` resized to `grid` as DINO's
    `interpolate_pos_encoding` does: bicubic, no antialiasing, the scale factor `(g + 0.1) / M`
    (the embeddings as they are when the grid is the trained one)."""
    if tuple(src) == tuple(grid):
        return patch_pos
    c = patch_pos.shape[-1]
    spatial = patch_pos.detach().float().reshape(1, *src, c).permute(0, 3, 1, 2)
    scale = ((grid[0] + 0.1) / src[0], (grid[1] + 0.1) / src[1])
    out = F.interpolate(spatial, scale_factor=scale, mode="bicubic", align_corners=False)
    if tuple(out.shape[-2:]) != tuple(grid):  # the +0.1 keeps floor(M · scale) at the grid
        raise ValueError(f"positions resized to {tuple(out.shape[-2:])}, not {grid}")
    return out.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], c).to(patch_pos.dtype)


class Proxy:
    """A timm ViT read for its patches; its inputs are images normalised with its own
    `mean`/`std` (`renormalize` converts CLIP-normalised ones), of any size (pixels past the
    last whole patch are not seen).

    spec: what it was loaded from; patch_size: input pixels per patch side; mean, std: the
    normalisation it was trained with (RGB, 0 … 1 units); prefix: class and register tokens
    before the patches; heads, depth: of its blocks.

    `tokens(x)` `[B, N, C]`: the last block's patch tokens after the final norm (prefix
    tokens dropped), as DINO's and DINOv2's `get_intermediate_layers` give them (ProxyCLIP's
    features). `attention(x, layer)` `[B, heads, T, T]`: a block's softmax attention over all
    `T = prefix + N` tokens; `qkv(x, layer)`: its per-head q, k, v `[B, heads, T, d]` (after
    any q/k norm). `grid(h, w)`: the patch grid of an `h × w` input.
    """

    def __init__(
        self,
        model: Any,
        spec: str,
        mean: Sequence[float] = _IMAGENET[0],
        std: Sequence[float] = _IMAGENET[1],
    ) -> None:
        for part in ("patch_embed", "blocks", "norm", "pos_embed"):
            if getattr(model, part, None) is None:
                raise ClipvizError(
                    f"proxy {spec}: {type(model).__name__} is not a ViT with absolute positions "
                    "(e.g. vit_base_patch8_224.dino)"
                )
        self.model, self.spec = model, spec
        self.mean, self.std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
        size = model.patch_embed.patch_size
        self.patch_size: tuple[int, int] = (int(size[0]), int(size[1]))
        self.prefix = int(model.num_prefix_tokens)
        self.depth = len(model.blocks)
        self.heads = int(model.blocks[0].attn.num_heads)
        self._positions: dict[tuple[int, int], torch.Tensor] = {}

    @property
    def device(self) -> torch.device:
        return self.model.pos_embed.device

    def grid(self, h: int, w: int) -> tuple[int, int]:
        """The patch grid `(h, w)` of an `h × w` input."""
        return h // self.patch_size[0], w // self.patch_size[1]

    def renormalize(
        self, images: torch.Tensor, mean: Sequence[float], std: Sequence[float]
    ) -> torch.Tensor:
        """`images` normalised with `mean`/`std` (CLIP's) normalised with the proxy's instead."""
        shape = (1, 3, 1, 1)

        def col(v: Sequence[float]) -> torch.Tensor:
            return torch.tensor(v, device=images.device, dtype=torch.float32).view(shape)

        pixels = images.float() * col(std) + col(mean)
        return (pixels - col(self.mean)) / col(self.std)

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        """The stream entering block 0 `[B, prefix + N, C]`."""
        m = self.model
        dtype = m.pos_embed.dtype
        gh, gw = self.grid(x.shape[-2], x.shape[-1])
        if min(gh, gw) < 1:
            raise ClipvizError(
                f"proxy {self.spec}: a {x.shape[-2]}x{x.shape[-1]} input is smaller than one "
                f"{self.patch_size[0]}x{self.patch_size[1]} patch"
            )
        # as a strided patch convolution, the pixels past the last whole patch are not seen
        x = x[..., : gh * self.patch_size[0], : gw * self.patch_size[1]]
        patches = m.patch_embed(x.to(self.device, dtype))  # [B, h, w, C] (dynamic size)
        b, h, w, c = patches.shape
        patches = patches.reshape(b, h * w, c)
        src = (int(m.patch_embed.grid_size[0]), int(m.patch_embed.grid_size[1]))
        pos = m.pos_embed[0]
        embedded_prefix = 0 if m.no_embed_class else self.prefix
        if (h, w) not in self._positions:
            self._positions[(h, w)] = dino_positions(pos[embedded_prefix:], src, (h, w))
        patches = patches + self._positions[(h, w)]
        prefix = [t.expand(b, -1, -1) for t in (m.cls_token, m.reg_token) if t is not None]
        if not prefix:
            return m.norm_pre(patches)
        tokens = torch.cat(prefix, dim=1)
        if embedded_prefix:  # the prefix tokens have positions of their own
            tokens = tokens + pos[:embedded_prefix]
        stream = torch.cat([tokens, patches], dim=1)
        return m.norm_pre(stream)

    def _index(self, layer: int) -> int:
        if not -self.depth <= layer < self.depth:
            raise ClipvizError(
                f"proxy {self.spec} has {self.depth} blocks; `layer` {layer} is not one of them"
            )
        return layer % self.depth

    @torch.no_grad()
    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """The last block's patch tokens `[B, N, C]` after the final norm."""
        stream = self._embed(x)
        for block in self.model.blocks:
            stream = block(stream)
        return self.model.norm(stream)[:, self.prefix :]

    @torch.no_grad()
    def qkv(
        self, x: torch.Tensor, layer: int = -1
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Block `layer`'s per-head q, k, v `[B, heads, T, d]` over all tokens."""
        index = self._index(layer)
        stream = self._embed(x)
        for block in self.model.blocks[:index]:
            stream = block(stream)
        block = self.model.blocks[index]
        attn = block.attn
        b, t, _ = stream.shape
        qkv = attn.qkv(block.norm1(stream)).reshape(b, t, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        return attn.q_norm(q), attn.k_norm(k), v

    @torch.no_grad()
    def attention(self, x: torch.Tensor, layer: int = -1) -> torch.Tensor:
        """Block `layer`'s softmax attention `[B, heads, T, T]` (`q kᵀ / √d`)."""
        q, k, _ = self.qkv(x, layer)
        return ((q.float() * q.shape[-1] ** -0.5) @ k.float().transpose(-2, -1)).softmax(dim=-1)


# -- loading -------------------------------------------------------------------------------


def _read_weights(path: Path, spec: str) -> dict[str, torch.Tensor]:
    if path.suffix.lower() not in _SUFFIXES:
        raise ClipvizError(
            f"proxy {spec}: {path.name} is not a weights file; use " + "/".join(_SUFFIXES)
        )
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a broken file fails in many ways
        raise ClipvizError(
            f"proxy {spec}: cannot read {path} ({type(e).__name__}); give a .safetensors file"
        ) from None
    for key in ("state_dict", "model", "teacher"):  # training checkpoints nest the weights
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ClipvizError(
            f"proxy {spec}: {path} holds no plain table of weights; save the model's "
            "state_dict() alone (safetensors.torch.save_file)"
        )
    return state


def _create(architecture: str, spec: str, model_args: dict[str, Any]) -> Any:
    import timm

    name = architecture.split(".")[0]
    if not timm.is_model(name):
        raise ClipvizError(
            f"proxy {spec}: timm has no model {architecture!r}; name a timm ViT such as "
            f"{DEFAULT_PROXY}, NAME=FILE, or a folder with config.json and model.safetensors"
        )
    try:
        return timm.create_model(
            architecture, pretrained=False, num_classes=0, dynamic_img_size=True, **model_args
        )
    except (TypeError, ValueError, RuntimeError) as e:
        raise ClipvizError(
            f"proxy {spec}: cannot build {architecture} with timm ({type(e).__name__}: {e}); "
            "name a ViT such as " + DEFAULT_PROXY
        ) from None


def _fill(model: Any, state: dict[str, torch.Tensor], spec: str) -> None:
    """Load `state` into `model`, through timm's conversion of other ViT checkpoints (DINO's,
    DINOv2's) when its names differ."""
    own = model.state_dict()
    if set(own) - set(state):
        convert = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
        if convert is not None:
            with contextlib.suppress(Exception):  # the check below names what is missing
                state = convert(state, model)
    missing = sorted(set(own) - set(state))
    extra = sorted(k for k in set(state) - set(own) if not k.startswith(("head.", "fc_norm.")))
    wrong = sorted(k for k in own if k in state and state[k].shape != own[k].shape)
    if missing or extra or wrong:
        first = (missing or extra or wrong)[0]
        raise ClipvizError(
            f"proxy {spec}: the weights do not fit the architecture ({len(missing)} missing, "
            f"{len(extra)} unexpected, {len(wrong)} of another shape, e.g. {first!r}); "
            "name the architecture they were saved from (NAME=FILE)"
        )
    if not all(bool(torch.isfinite(state[k]).all()) for k in own if state[k].is_floating_point()):
        raise ClipvizError(
            f"proxy {spec}: the weights hold values that are not finite; the file is corrupt "
            "or the training diverged — use other weights"
        )
    model.load_state_dict({k: state[k] for k in own})


def _hub_weights(name: str) -> Path:
    import timm

    cfg = timm.models.get_pretrained_cfg(name)
    repo = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if cfg is None or not repo or "." not in name:
        raise ClipvizError(
            f"proxy {name}: not a timm model with pretrained weights on the model hub; name one "
            f"such as {DEFAULT_PROXY}, or give NAME=FILE"
        )
    if cached := hub.cached_hf_file(repo, WEIGHT_FILES):
        return Path(cached)
    how = (
        f"download {repo}'s model.safetensors once with network, or give a local file: "
        f"`proxy` {name}=FILE.safetensors, or a folder with config.json and model.safetensors"
    )
    if not hub.hub_reachable(hub.hf_endpoint()):
        raise ClipvizError(
            f"no cached weights for proxy {name} and the model hub cannot be reached (offline); "
            + how
        )
    for filename in WEIGHT_FILES:
        try:
            if found := hub.hub_file(repo, filename, offline=False):
                return found
        except Exception as e:  # noqa: BLE001 - network and hub errors come in many types
            raise ClipvizError(
                f"could not download proxy {name} ({type(e).__name__}); {how}"
            ) from None
    raise ClipvizError(f"proxy {name}: {repo} has no weights file; {how}")


def _folder_config(folder: Path, spec: str) -> dict[str, Any]:
    path = folder / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ClipvizError(
            f"proxy {spec}: cannot read {path} ({type(e).__name__}); a proxy folder holds timm's "
            "config.json (with `architecture`) and model.safetensors"
        ) from None
    if not isinstance(config, dict) or not isinstance(config.get("architecture"), str):
        raise ClipvizError(
            f"proxy {spec}: {path} names no `architecture`; add the timm model the weights "
            f'were saved from, e.g. "architecture": "{DEFAULT_PROXY}"'
        )
    return config


def _parse(spec: str) -> tuple[str, Path | None, dict[str, Any]]:
    """(architecture, weights file or None for the hub, folder config)."""
    text = spec.strip()
    path = Path(text).expanduser()
    if path.is_dir() or path.is_file():
        folder = path if path.is_dir() else path.parent
        if not (folder / "config.json").is_file():
            if path.is_dir():
                raise ClipvizError(
                    f"proxy {spec}: the folder has no config.json; give NAME=FILE for a weights "
                    f"file (e.g. {DEFAULT_PROXY}=FILE.safetensors)"
                )
            raise ClipvizError(
                f"proxy {spec}: say which timm architecture the weights are for: NAME=FILE "
                f"(e.g. {DEFAULT_PROXY}={path})"
            )
        config = _folder_config(folder, spec)
        if path.is_file():
            return config["architecture"], path, config
        for name in WEIGHT_FILES:
            if (folder / name).is_file():
                return config["architecture"], folder / name, config
        raise ClipvizError(f"proxy {spec}: the folder holds no {' or '.join(WEIGHT_FILES)}")
    name, eq, file = text.partition("=")
    if eq:
        weights = Path(file.strip()).expanduser()
        if not weights.is_file():
            raise ClipvizError(f"proxy {spec}: no weights file {weights}")
        return name.strip(), weights, {}
    if os.sep in text or text.endswith(_SUFFIXES):
        raise ClipvizError(
            f"proxy {spec}: no such file or folder; check the path, or name a timm model "
            f"(e.g. {DEFAULT_PROXY})"
        )
    return text, None, {}


def load_proxy(spec: str, device: torch.device | str = "cpu") -> Proxy:
    """The proxy model `spec` names (see the module docstring), in eval mode on `device`; a
    spec that names nothing loadable is a usage error saying how to give one."""
    architecture, weights, config = _parse(spec)
    model = _create(architecture, spec, dict(config.get("model_args") or {}))
    _fill(model, _read_weights(weights or _hub_weights(architecture), spec), spec)
    cfg = {**(model.pretrained_cfg or {}), **(config.get("pretrained_cfg") or {})}
    mean, std = cfg.get("mean") or _IMAGENET[0], cfg.get("std") or _IMAGENET[1]
    if len(mean) != 3 or len(std) != 3 or not all(math.isfinite(s) and s > 0 for s in std):
        raise ClipvizError(
            f"proxy {spec}: its mean/std are not three channels' values; give three means "
            "and three positive stds in config.json's pretrained_cfg"
        )
    model.eval().requires_grad_(False).to(device)
    return Proxy(model, spec, mean, std)


def proxy_files(spec: str) -> list[Path]:
    """The local files the proxy `spec` is read from (its weights, and its folder's
    config.json); none for a model hub name or a spec that names nothing loadable."""
    try:
        _, weights, config = _parse(spec)
    except ClipvizError:
        return []
    if weights is None:
        return []
    return [weights, weights.parent / "config.json"] if config else [weights]


def proxy_stamp(spec: str) -> tuple[Any, ...]:
    """What identifies a proxy for caching: the spec, and its files' paths, sizes and times
    (weights rewritten at the same path are another proxy)."""
    stamp: list[Any] = [spec]
    for path in proxy_files(spec):
        try:
            st = path.stat()
        except OSError:
            continue
        stamp += [os.path.realpath(path), st.st_size, st.st_mtime_ns]
    return tuple(stamp)


def attached_proxy(backend: Any, spec: str) -> Proxy:
    """The proxy `spec` names, loaded once per backend (on its device) and kept with it."""
    return backend.memo(("proxy", *proxy_stamp(spec)), lambda: load_proxy(spec, backend.device))
