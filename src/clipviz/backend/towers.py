"""What a method may ask of an image tower, and the registry of the adapters that offer it.

Every image tower is read through one adapter. The adapter's `kind` says which interface it
offers, and its `capabilities` what more a method may rely on:

- `"tokens"` (`TOKENS`) — a token stream read block by block (`TokenTower`): open_clip, timm
  and transformers ViTs, and the last stage of FastViT and Swin, whose global attention is read
  the same way; the word names the interface, not an architecture.
  With `"readout"` in its capabilities the tower's head reads its patches through a class
  token or a probe (`ReadoutTower`); with `"linear_head"` its embedding is
  `post_norm(class token) @ proj` and splits by head (`LinearHeadTower`).
- `"rn"` (`RESNET`) — open_clip's ModifiedResNet: stages, then an attention pool
  (`ResNetPoolTower`).
- `"conv"` (`MAP`) — a tower that pools a feature map (`ConvMapTower`).

Each adapter module registers its class with `@register_adapter(match)`; `tower_adapter`
imports the modules of this package once and asks each match in turn (the higher
`priority` first), so a new family is one new module here.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import torch

from ..errors import ClipvizError

# the kinds' words, kept where the method catalogue reads them without torch
from ..tower_kinds import MAP as MAP
from ..tower_kinds import RESNET as RESNET
from ..tower_kinds import TOKENS as TOKENS

Memo = Callable[[Hashable, Callable[[], Any]], Any]


class Tower(Protocol):
    """What every image tower's adapter offers."""

    @property
    def kind(self) -> str:
        """`tokens`, `rn` or `conv`: which of the interfaces below the adapter offers."""

    @property
    def family(self) -> str:
        """The tower's family in words, e.g. "timm Eva, map head"."""

    @property
    def capabilities(self) -> frozenset[str]:
        """What methods may rely on besides the interface (`attention`, `readout`, …)."""

    @property
    def prefix(self) -> int:
        """Tokens before the patches (class, register or mean tokens), left out of maps."""

    @property
    def readout(self) -> str | None:
        """What reads the patches for the image: `class` (a token), `latent` (a probe)."""

    @property
    def depth(self) -> int:
        """Blocks, or stages, that methods address by index."""

    def grid(self, size: tuple[int, int]) -> tuple[int, int]:
        """Spatial size `(h, w)` of the maps for an input of `size` (H, W)."""

    def check_size(self, size: tuple[int, int]) -> None:
        """A usage error for input sizes the tower cannot read."""

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        """The stock forward as joint-space tokens `[B, 1+N, D]` (not normalised)."""

    def image_embedding(self, images: torch.Tensor) -> torch.Tensor:
        """The stock forward's image embedding `[B, D]` alone (not normalised)."""

    def cascade(self) -> list[tuple[str, list[Any]]]:
        """The tower's layers from the top, as modules or parameters."""


class TokenTower(Tower, Protocol):
    """A token stream read block by block, with each block's attention (kind `tokens`)."""

    @property
    def heads(self) -> int: ...

    @property
    def explicit_attention(self) -> bool: ...

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """The stream entering block 0 `[B, prefix + N, W]`."""

    def run_block(self, i: int, x: torch.Tensor) -> torch.Tensor: ...

    def run_blocks(
        self, x: torch.Tensor, start: int = 0, stop: int | None = None
    ) -> torch.Tensor: ...

    def norm1(self, i: int, x: torch.Tensor) -> torch.Tensor: ...

    def qkv(self, i: int, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...

    def attn_out(self, i: int, heads_out: torch.Tensor) -> torch.Tensor: ...

    def mlp(self, i: int, y: torch.Tensor) -> torch.Tensor: ...

    def attention_scale(self, i: int) -> float | None: ...

    def attention_bias(self, i: int) -> torch.Tensor | None: ...

    def attend(self, i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor: ...

    def block_with_attention(
        self, i: int, x: torch.Tensor, normed: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]: ...

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Last-block tokens -> joint-space tokens `[B, 1+N, D]`; token 0 is the embedding."""

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """The model's own image embedding `[B, D]` from the last block's tokens."""

    def mean_embedding(self, x: torch.Tensor) -> torch.Tensor: ...


class ProbeHead(Protocol):
    """An attention-pool probe (SigLIP's MAP head, CoCa's pooler) read as the image's query."""

    @property
    def pool_sees_prefix(self) -> bool: ...

    def pool_input(self, x: torch.Tensor, norm: bool = True) -> torch.Tensor: ...

    def latent_probs(self, tokens: torch.Tensor) -> torch.Tensor: ...

    def pool_from_probs(self, tokens: torch.Tensor, probs: torch.Tensor) -> torch.Tensor: ...

    def patch_columns(self, probs: torch.Tensor) -> torch.Tensor: ...

    def after_pool(self, pooled: torch.Tensor) -> torch.Tensor:
        """A pooled feature through the rest of the head into the joint space."""


class ReadoutTower(TokenTower, ProbeHead, Protocol):
    """A token tower whose head reads the patches (capability `readout`): what ECLIP and
    the probe methods use."""

    @property
    def proj(self) -> torch.Tensor: ...

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """A pooled feature `[..., W]` into the joint space."""

    @property
    def post_norm(self) -> Any: ...

    @property
    def trains_post_norm(self) -> bool:
        """ECLIP may train a copy of `post_norm` (its inputs are `post_norm(patches)`)."""

    def explain_inputs(self, x: torch.Tensor) -> torch.Tensor: ...

    def explain_projection(self) -> tuple[torch.Tensor, torch.Tensor | None]: ...


class LinearHeadTower(ReadoutTower, Protocol):
    """A readout tower whose embedding is `post_norm(class token) @ proj` (capability
    `linear_head`): its heads' contributions can be read one by one."""

    def head_outputs(self, i: int, mixed: torch.Tensor) -> torch.Tensor: ...

    def head_directions(self, i: int, directions: torch.Tensor) -> torch.Tensor: ...


class ResNetPoolTower(Tower, Protocol):
    """open_clip's ModifiedResNet: residual stages, then an attention pool (kind `rn`)."""

    @property
    def heads(self) -> int: ...

    @property
    def value_projection(self) -> Any: ...

    @property
    def output_projection(self) -> Any: ...

    def stem(self, images: torch.Tensor) -> torch.Tensor: ...

    def run_stages(self, x: torch.Tensor, start: int = 0, stop: int = 4) -> torch.Tensor: ...

    def features(self, images: torch.Tensor) -> torch.Tensor: ...

    def pool_inputs(self, features: torch.Tensor) -> torch.Tensor: ...

    def pool_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...

    def pool_out(self, heads_out: torch.Tensor) -> torch.Tensor: ...

    def attention_pool(self, x: torch.Tensor) -> torch.Tensor: ...

    def mean_query_pool(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def pooled(self, x: torch.Tensor) -> torch.Tensor: ...

    def value_tokens(self, features: torch.Tensor) -> torch.Tensor: ...


class ConvMapTower(Tower, Protocol):
    """A tower that pools a final feature map (kind `conv`)."""

    def features(self, images: torch.Tensor) -> torch.Tensor: ...

    def stages(self) -> list[Any]: ...

    def stage_output(
        self, images: torch.Tensor, stage: int
    ) -> tuple[torch.Tensor, torch.Tensor]: ...

    def pooled(self, features: torch.Tensor) -> torch.Tensor: ...

    def location_tokens(self, features: torch.Tensor) -> torch.Tensor: ...


# -- the registry --------------------------------------------------------------------------

Match = Callable[[Any], bool]  # open_clip's `model.visual` -> True if the adapter reads it
Build = Callable[[Any, Memo, str], Tower]
B = TypeVar("B", bound=Build)


@dataclass(frozen=True)
class Adapter:
    """A registered adapter: its match and its constructor `(visual, memo, name)`."""

    name: str
    match: Match
    build: Build
    priority: int


_ADAPTERS: list[Adapter] = []


def register_adapter(match: Match, priority: int = 0) -> Callable[[B], B]:
    """Register an adapter class (or factory) for the image towers `match` accepts.

    priority: asked before the adapters of lower priority (a family that narrows a broader
    one, e.g. register-token ViTs among timm ViTs, registers above it).
    """

    def add(build: B) -> B:
        name = f"{build.__module__}.{getattr(build, '__qualname__', repr(build))}"
        _ADAPTERS[:] = [a for a in _ADAPTERS if a.name != name]  # a module imported again
        _ADAPTERS.append(Adapter(name, match, build, priority))
        _ADAPTERS.sort(key=lambda a: -a.priority)  # stable: equal priorities keep their order
        return build

    return add


@functools.cache
def _import_adapter_modules() -> None:
    """Import every module of this package, so that each registers its adapters."""
    package = __name__.rpartition(".")[0]
    for info in pkgutil.iter_modules(importlib.import_module(package).__path__):
        importlib.import_module(f"{package}.{info.name}")


def adapters() -> list[Adapter]:
    """The registered adapters, in the order they are asked."""
    _import_adapter_modules()
    return list(_ADAPTERS)


def tower_adapter(visual: Any, memo: Memo, name: str) -> Tower:
    """The adapter of an open_clip image tower's family, or a usage error naming it."""
    for adapter in adapters():
        if adapter.match(visual):
            return adapter.build(visual, memo, name)
    trunk = getattr(visual, "trunk", None)
    what = f"timm {type(trunk).__name__}" if trunk is not None else type(visual).__name__
    raise ClipvizError(
        f"{name}: the image tower {what} is not supported; `clipviz models` lists the "
        "architectures clipviz explains"
    )


def timm_trunk(visual: Any) -> Any | None:
    """The timm trunk of an open_clip `TimmModel` tower (None for other towers)."""
    return getattr(visual, "trunk", None)
