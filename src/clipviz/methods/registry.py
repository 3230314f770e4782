"""The method registry: a method registers itself where it is defined, and its options are the
keyword parameters of its function.

    @register("gradcam", towers=(TOKENS, RESNET), summary="…", citation="…", reference="…",
              ranges={"layer": "[-256, 255]"})
    def gradcam(backend, images, texts, layer: int = -1) -> MapResult:
        '''…
        layer: the block whose `ln_1` output is read (−1 = last).
        '''

A method function takes `(backend, images [B, 3, H, W], texts)` and its options, and returns
raw maps `[B, T, h, w]` (float32) in a `MapResult`; normalising, upsampling and rendering
happen once, outside the methods. Option names, types (from the annotation) and defaults come
from the signature, their help from the docstring's `name: text` lines. Every int and float
option declares in `ranges` the finite values it allows, checked whenever options are bound
(block counts and indexes are capped at 256 there; each method checks them against its
tower's depth when it runs). The options themselves (`Option`, `Range`, `signature_options`)
live in `options.py` and are importable from here too. This module imports neither torch nor
open_clip: `catalog.py` reads the same facts from the source for `--help`.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ClipvizError
from ..tower_kinds import KINDS, tower_kind
from .options import FIXED_PARAMETERS as FIXED_PARAMETERS
from .options import Option, signature_options
from .options import Range as Range
from .options import option_help as option_help
from .options import with_ranges as with_ranges

if TYPE_CHECKING:
    import torch

TOWERS = KINDS


@dataclass(frozen=True)
class MapResult:
    """Raw maps `[B, T, h, w]`, plus the global image embeddings `[B, D]` when the method
    computed them on the way (so the caller need not run the model again for scores)."""

    maps: torch.Tensor
    image_embeddings: torch.Tensor | None = None
    # what else the method explains, per image (first axis B), e.g. `text_importance`
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    # names along the last axis of an extra, shared by the batch, e.g. `text_tokens` [T, n]
    labels: dict[str, list[list[str]]] = field(default_factory=dict)


@dataclass(frozen=True)
class MethodInfo:
    """What a method is, without its code: enough for `--help`, `clipviz methods` and errors."""

    name: str
    summary: str
    citation: str
    reference: str
    towers: tuple[str, ...]
    options: tuple[Option, ...] = ()
    # per tower family, what the tower's adapter must offer (its `capabilities`): "attention"
    # (explicit per-block attention), "readout" (a class token or a MAP probe reading the
    # patches), "class_token", "probe", "eclip" (an explain head can be built)
    needs: tuple[tuple[str, tuple[str, ...]], ...] = ()
    # what the method computes with no options, as its authors' released code does (the
    # defaults table of docs/methods.md)
    defaults: str = ""

    def fits(self, tower: str, capabilities: frozenset[str]) -> bool:
        """True if the method is defined for a tower of this family with these capabilities."""
        return tower in self.towers and set(dict(self.needs).get(tower, ())) <= capabilities

    def option(self, name: str) -> Option:
        for opt in self.options:
            if opt.name == name:
                return opt
        raise ClipvizError(f"method {self.name} has no option {name!r}; {self.options_text()}")

    def options_text(self) -> str:
        if not self.options:
            return f"{self.name} takes no options"
        return f"{self.name} options: " + "; ".join(o.describe() for o in self.options)

    def bind(self, values: Mapping[str, Any] | None, from_text: bool = False) -> dict[str, Any]:
        """Checked option values for a call; an unknown or ill-typed option is a usage error
        that lists the method's options."""
        if values is not None and not isinstance(values, Mapping):
            raise ClipvizError(
                f"method {self.name}: options must be a mapping of name to value, not "
                f"{type(values).__name__}; {self.options_text()}"
            )
        bound: dict[str, Any] = {}
        for key, value in (values or {}).items():
            opt = self.option(key)
            try:
                bound[key] = opt.convert(value, from_text)
            except ValueError:
                raise ClipvizError(
                    f"method {self.name}: option {key}={value!r} is not {opt.type}"
                    + (f" (one of {', '.join(map(str, opt.choices))})" if opt.choices else "")
                    + f"; {self.options_text()}"
                ) from None
            opt.check_range(bound[key], self.name)
        return bound


@dataclass(frozen=True)
class Method:
    """A registered method: its function and what it is."""

    info: MethodInfo
    fn: Callable[..., MapResult] = field(repr=False)

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def towers(self) -> tuple[str, ...]:
        return self.info.towers

    @property
    def options(self) -> tuple[Option, ...]:
        return self.info.options


_REGISTRY: dict[str, Method] = {}


def normalized_needs(
    needs: Mapping[str, Sequence[str]] | None,
) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """`needs` as `MethodInfo` keeps it (sorted pairs), the same from the registry and the
    catalogue."""
    return tuple(sorted((tower_kind(k), tuple(v)) for k, v in (needs or {}).items()))


def register(
    name: str,
    *,
    towers: tuple[str, ...],
    summary: str,
    citation: str,
    reference: str,
    needs: dict[str, tuple[str, ...]] | None = None,
    ranges: dict[str, str] | None = None,
    defaults: str = "",
) -> Callable[[Callable[..., MapResult]], Callable[..., MapResult]]:
    """Register a method function under `name` (arguments must be literals, or the kinds
    `TOKENS`, `RESNET`, `MAP` by those names: `catalog.py` reads them from the source).
    `towers`: the kinds of image tower the method is written for (the former word `"vit"` is
    read as `"tokens"`). `needs`: per tower kind, the adapter capabilities the method reads
    (see `MethodInfo.needs`). `ranges`: per int or float option, the finite
    values it allows as an interval (`"[0, 20]"`, `"(0, 1000]"`), checked when options are
    bound. `defaults`: what the method computes with no options, in the words of its
    reference code (the defaults table of docs/methods.md)."""
    towers = tuple(tower_kind(t) for t in towers)
    if unknown := set(towers) - set(TOWERS):
        raise ValueError(f"unknown towers {unknown}")
    requirements = normalized_needs(needs)

    def decorate(fn: Callable[..., MapResult]) -> Callable[..., MapResult]:
        if name in _REGISTRY and _REGISTRY[name].fn.__qualname__ != fn.__qualname__:
            raise ValueError(f"method {name!r} is registered twice")
        options = signature_options(fn, ranges)
        info = MethodInfo(
            name, summary, citation, reference, towers, options, requirements, defaults
        )
        _REGISTRY[name] = Method(info, fn)
        return fn

    return decorate


# modules of this package that define no methods
NOT_METHOD_MODULES = frozenset({"registry", "catalog", "options"})
# how listings order the methods (a method not named here comes after these, by name)
DISPLAY_ORDER = ("itsm", "eclip", "surgery", "maskclip", "clearclip", "sclip", "naclip", "gem",
                 "gradcam", "gradeclip", "gae", "legrad", "gscorecam", "textspan", "rollout",
                 "convis", "attention", "random")  # fmt: skip


def display_order(names: Sequence[str]) -> list[str]:
    rank = {n: i for i, n in enumerate(DISPLAY_ORDER)}
    return sorted(names, key=lambda n: (rank.get(n, len(rank)), n))


def methods() -> dict[str, Method]:
    """Every registered method, by name (importing the method modules on first use)."""
    for mod in pkgutil.iter_modules([str(Path(__file__).parent)]):
        if mod.name not in NOT_METHOD_MODULES:
            importlib.import_module(f"{__package__}.{mod.name}")
    return {name: _REGISTRY[name] for name in display_order(list(_REGISTRY))}


def get_method(name: str) -> Method:
    """The method called `name`, or a usage error listing the choices."""
    registry = methods()
    try:
        return registry[name.lower()]
    except KeyError:
        raise ClipvizError(f"unknown method {name!r}; choose from: {', '.join(registry)}") from None


def check_methods(backend: Any, names: Sequence[str]) -> None:
    """Refuse, before any work, a method that is unknown or not defined for the model's
    image tower (the message lists the methods that are)."""
    for name in names:
        spec = get_method(name)
        caps = backend.vision.capabilities
        if not spec.info.fits(backend.tower, caps):
            fitting = [m.name for m in methods().values() if m.info.fits(backend.tower, caps)]
            raise ClipvizError(
                f"method {spec.name} is not defined for {backend.identity.get('model')}'s "
                f"image tower ({backend.family}); methods for it: {', '.join(fitting)} "
                "(choose another `method` or `model`)"
            )


def method_options(
    methods_run: Sequence[str], raw: Sequence[str] = (), values: Mapping[str, Any] | None = None
) -> dict[str, dict[str, Any]]:
    """Per-method option values from `KEY=VALUE` strings (`-O layer=-2`, or `-O gradcam.layer=-2`
    for one method) and from already-typed `values` keyed the same way.

    An unqualified key goes to every method run that has that option; a key no method run
    has, or a method not run, is a usage error.
    """
    specs = [get_method(m) for m in methods_run]
    out: dict[str, dict[str, Any]] = {s.name: {} for s in specs}
    items: list[tuple[str, Any, bool]] = []
    for text in raw:
        key, sep, value = text.partition("=")
        if not sep or not key.strip():
            raise ClipvizError(f"method option {text!r} is not KEY=VALUE (e.g. -O layer=-2)")
        items.append((key.strip(), value.strip(), True))
    items += [(k, v, False) for k, v in (values or {}).items()]
    for key, value, from_text in items:
        method, dot, name = key.rpartition(".")
        targets = [s for s in specs if s.name == method] if dot else specs
        if dot and not targets:
            raise ClipvizError(
                f"method option {key}: {method} is not among the methods run "
                f"({', '.join(s.name for s in specs)}); add `method` {method}"
            )
        having = [s for s in targets if any(o.name == name for o in s.options)]
        if not having:
            listed = " | ".join(s.info.options_text() for s in targets)
            raise ClipvizError(f"unknown method option {name!r}; {listed}")
        for s in having:
            out[s.name].update(s.info.bind({name: value}, from_text))
    return out
