"""Method options: what a method's keyword parameters become. An `Option` has the name, type
(the annotation's text), default and help (the docstring's `name: text` line) of a parameter,
and for a number the `Range` its registration declares; it converts values from Python or
from command-line text and refuses the ones outside its type or range. `signature_options`
reads them from a method function; `registry.py` keeps the methods. Imports neither torch nor
open_clip.
"""

from __future__ import annotations

import ast
import inspect
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import ClipvizError

# parameters every method takes before its options
FIXED_PARAMETERS = ("backend", "images", "texts")
_BASIC = {"int": int, "float": float, "str": str, "bool": bool}
_SEQUENCES = {"Sequence", "list", "tuple"}
_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


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
