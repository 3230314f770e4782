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
tower's depth when it runs). This module imports neither torch nor open_clip: `catalog.py`
reads the same facts from the source for `--help`.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import math
import pkgutil
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ClipvizError
from ..tower_kinds import KINDS, tower_kind

if TYPE_CHECKING:
    import torch

TOWERS = KINDS
# parameters every method takes before its options
FIXED_PARAMETERS = ("backend", "images", "texts")
_BASIC = {"int": int, "float": float, "str": str, "bool": bool}
_SEQUENCES = {"Sequence", "list", "tuple"}
_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


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


# -- options -------------------------------------------------------------------------------


def _members(annotation: str) -> list[ast.expr]:
    """The alternatives of a union annotation (`int | None` -> [int, None])."""

    def split(node: ast.expr) -> list[ast.expr]:
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
            return split(node.left) + split(node.right)
        return [node]

    try:
        return split(ast.parse(annotation, mode="eval").body)
    except SyntaxError:
        raise ClipvizError(f"unsupported option annotation {annotation!r}") from None


def _convert(node: ast.expr, value: Any, from_text: bool) -> Any:
    """`value` as the type `node` describes, or raise ValueError."""
    if isinstance(node, ast.Constant) and node.value is None:
        if value is None or (from_text and str(value).lower() in ("none", "null")):
            return None
        raise ValueError
    if isinstance(node, ast.Name) and node.id in _BASIC:
        kind = _BASIC[node.id]
        if kind is bool:
            if isinstance(value, bool):
                return value
            if from_text and str(value).lower() in _TRUE | _FALSE:
                return str(value).lower() in _TRUE
            raise ValueError
        if from_text:
            return kind(value)
        if kind is float and isinstance(value, int | float) and not isinstance(value, bool):
            try:
                return float(value)
            except OverflowError:  # an int past float's range: out of any option's range
                return math.inf if value > 0 else -math.inf
        if isinstance(value, kind) and not isinstance(value, bool):
            return value
        raise ValueError
    if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name):
        outer = node.value.id
        if outer == "Literal":
            choices = [ast.literal_eval(e) for e in _literal_elements(node)]
            for c in choices:
                if value == c or (from_text and str(value) == str(c)):
                    return c
            raise ValueError
        if outer in _SEQUENCES:
            inner = node.slice.elts[0] if isinstance(node.slice, ast.Tuple) else node.slice
            items = value.split(",") if from_text and isinstance(value, str) else value
            if isinstance(items, str) or not isinstance(items, Sequence):
                raise ValueError
            return [
                _convert(inner, v.strip() if isinstance(v, str) else v, from_text) for v in items
            ]
    raise ValueError


def _literal_elements(node: ast.Subscript) -> list[ast.expr]:
    return list(node.slice.elts) if isinstance(node.slice, ast.Tuple) else [node.slice]


_NUMBER = r"\s*([-+]?[0-9][0-9_.eE+-]*)\s*"
_INTERVAL = re.compile(rf"\s*([\[(]){_NUMBER},{_NUMBER}([\])])\s*")


def _number(text: str) -> int | float:
    try:
        return int(text)
    except ValueError:
        return float(text)


@dataclass(frozen=True)
class Range:
    """The finite values a numeric option allows, an interval as mathematics writes it:
    `[1, 20]` holds both ends, `(0, 1000]` everything above 0 up to 1000 inclusive."""

    low: int | float
    high: int | float
    low_open: bool = False
    high_open: bool = False

    @classmethod
    def parse(cls, text: str) -> Range:
        """`[a, b]`, `(a, b]`, `[a, b)` or `(a, b)` with finite `a < b`, or ValueError."""
        m = _INTERVAL.fullmatch(text)
        if not m:
            raise ValueError(f"range {text!r} is not an interval such as [1, 20] or (0, 1000]")
        low, high = _number(m.group(2)), _number(m.group(3))
        if not (math.isfinite(low) and math.isfinite(high) and low < high):
            raise ValueError(f"range {text!r} needs finite ends, the lower one first")
        return cls(low, high, m.group(1) == "(", m.group(4) == ")")

    def __contains__(self, value: object) -> bool:
        if not isinstance(value, int | float) or isinstance(value, bool):
            return False
        if isinstance(value, float) and not math.isfinite(value):
            return False
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def __str__(self) -> str:
        left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
        return f"{left}{self.low}, {self.high}{right}"

    def words(self) -> str:
        """The range in words: `from 1 to 20`, `above 0 and at most 1000`."""
        if not self.low_open and not self.high_open:
            return f"from {self.low} to {self.high}"
        low = f"above {self.low}" if self.low_open else f"at least {self.low}"
        high = f"below {self.high}" if self.high_open else f"at most {self.high}"
        return f"{low} and {high}"


@dataclass(frozen=True)
class Option:
    """One method knob: its name, type (the annotation's text), default, help and, for a
    number, the range it allows."""

    name: str
    type: str
    default: Any
    help: str = ""
    range: Range | None = None

    def convert(self, value: Any, from_text: bool = False) -> Any:
        """`value` checked against the type (`from_text`: parse a command-line string)."""
        for member in _members(self.type):
            try:
                return _convert(member, value, from_text)
            except (ValueError, TypeError):
                continue
        raise ValueError(f"expected {self.type}")

    @property
    def choices(self) -> list[Any]:
        """The allowed values of a `Literal[...]` option (empty for other types)."""
        return [
            ast.literal_eval(e)
            for m in _members(self.type)
            if isinstance(m, ast.Subscript) and getattr(m.value, "id", "") == "Literal"
            for e in _literal_elements(m)
        ]

    @property
    def numeric(self) -> bool:
        """True for an int or float option (`None` may be allowed besides)."""
        return any(
            isinstance(m, ast.Name) and m.id in ("int", "float") for m in _members(self.type)
        )

    def check_range(self, value: Any, method: str) -> None:
        """Refuse a number outside the option's range (`None`, where allowed, passes)."""
        if self.range is None or value is None or value in self.range:
            return
        kind = "an integer" if "int" in self.type else "a finite number"
        raise ClipvizError(
            f"method {method}: option {self.name}={value} is outside {self.range}; pass "
            f"{kind} {self.range.words()}"
        )

    def describe(self) -> str:
        """`name: type = default, range [a, b] — help`, as `clipviz methods` and errors list
        it."""
        text = f"{self.name}: {self.type} = {self.default!r}"
        text += f", range {self.range}" if self.range else ""
        return f"{text} — {self.help}" if self.help else text


def option_help(doc: str | None, names: Sequence[str]) -> dict[str, str]:
    """The `name: text` lines of a docstring for the given parameter names (continuation
    lines, indented deeper, are joined)."""
    helps: dict[str, str] = {}
    current, indent = None, 0
    for line in (doc or "").splitlines():
        stripped = line.strip()
        m = re.match(r"^(\s*)(\w+): (.+)$", line)
        if m and m.group(2) in names:
            current, indent = m.group(2), len(m.group(1))
            helps[current] = m.group(3).strip()
        elif current and stripped and len(line) - len(line.lstrip()) > indent:
            helps[current] += " " + stripped
        else:
            current = None
    return helps


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


def with_ranges(
    options: Sequence[Option], ranges: Mapping[str, str] | None, method: str
) -> tuple[Option, ...]:
    """`options` with the ranges of `register(ranges=...)` attached; a range for an option
    that is not there or not a number, or one its default falls outside, is a TypeError."""
    ranges = dict(ranges or {})
    if unknown := set(ranges) - {o.name for o in options}:
        raise TypeError(f"{method}: ranges for no option {', '.join(map(repr, sorted(unknown)))}")
    out = []
    for opt in options:
        if opt.name not in ranges:
            out.append(opt)
            continue
        if not opt.numeric:
            raise TypeError(f"{method}: option {opt.name} is not numeric; it takes no range")
        try:
            r = Range.parse(ranges[opt.name])
        except ValueError as e:
            raise TypeError(f"{method}: option {opt.name}: {e}") from None
        if opt.default is not None and opt.default not in r:
            raise TypeError(f"{method}: option {opt.name}'s default {opt.default} is outside {r}")
        out.append(Option(opt.name, opt.type, opt.default, opt.help, r))
    return tuple(out)


def signature_options(
    fn: Callable[..., Any], ranges: Mapping[str, str] | None = None
) -> tuple[Option, ...]:
    """The options of a method function: its parameters after `FIXED_PARAMETERS`, with the
    `ranges` its registration declares."""
    params = list(inspect.signature(fn).parameters.values())
    names = tuple(p.name for p in params[: len(FIXED_PARAMETERS)])
    if names != FIXED_PARAMETERS:
        raise TypeError(f"{fn.__name__} must take {FIXED_PARAMETERS} first, not {names}")
    rest = params[len(FIXED_PARAMETERS) :]
    helps = option_help(inspect.getdoc(fn), [p.name for p in rest])
    options = []
    for p in rest:
        if p.default is inspect.Parameter.empty or p.annotation is inspect.Parameter.empty:
            raise TypeError(f"{fn.__name__}: option {p.name} needs an annotation and a default")
        annotation = p.annotation if isinstance(p.annotation, str) else p.annotation.__name__
        options.append(Option(p.name, annotation, p.default, helps.get(p.name, "")))
    return with_ranges(options, ranges, fn.__name__)


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
NOT_METHOD_MODULES = frozenset({"registry", "catalog"})
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
