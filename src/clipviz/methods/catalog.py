"""The registered methods read from their source files, without importing them.

`--help` and `clipviz methods` must not pay for importing torch, so they read each
`@register(...)` decorator's literal arguments (the tower kinds named by their constants
included) and its function's signature and docstring with `ast`. The method contract test checks that this catalogue equals the imported registry.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

from .. import tower_kinds
from ..tower_kinds import tower_kind
from .registry import (
    FIXED_PARAMETERS,
    NOT_METHOD_MODULES,
    MethodInfo,
    Option,
    display_order,
    normalized_needs,
    option_help,
    with_ranges,
)


def _register_call(fn: ast.FunctionDef) -> ast.Call | None:
    for deco in fn.decorator_list:
        if isinstance(deco, ast.Call) and getattr(deco.func, "id", None) == "register":
            return deco
    return None


class _Kinds(ast.NodeTransformer):
    """The tower kinds' constants (`TOKENS`, `tower_kinds.TOKENS`, …) as their words."""

    def visit_Name(self, node: ast.Name) -> ast.AST:
        return _word(node, node.id)

    def visit_Attribute(self, node: ast.Attribute) -> ast.AST:
        return _word(node, node.attr)


def _word(node: ast.AST, name: str) -> ast.AST:
    if name in _KIND_NAMES:
        return ast.copy_location(ast.Constant(getattr(tower_kinds, name)), node)
    return node


_KIND_NAMES = ("TOKENS", "RESNET", "MAP")


def _literal(node: ast.expr) -> Any:
    return ast.literal_eval(_Kinds().visit(node))


def _info(fn: ast.FunctionDef, call: ast.Call) -> MethodInfo:
    kw = {k.arg: _literal(k.value) for k in call.keywords if k.arg}
    args = fn.args.args + fn.args.kwonlyargs
    defaults = [None] * (len(fn.args.args) - len(fn.args.defaults)) + list(fn.args.defaults)
    defaults += list(fn.args.kw_defaults)
    params = [
        (a.arg, ast.unparse(a.annotation) if a.annotation else "", d)
        for a, d in zip(args, defaults, strict=True)
    ][len(FIXED_PARAMETERS) :]
    helps = option_help(ast.get_docstring(fn), [p[0] for p in params])
    options = tuple(
        Option(name, annotation, ast.literal_eval(default) if default else None,
               helps.get(name, ""))
        for name, annotation, default in params
    )  # fmt: skip
    options = with_ranges(options, kw.get("ranges"), fn.name)
    return MethodInfo(
        name=ast.literal_eval(call.args[0]),
        summary=kw["summary"],
        citation=kw["citation"],
        reference=kw["reference"],
        towers=tuple(tower_kind(t) for t in kw["towers"]),
        options=options,
        needs=normalized_needs(kw.get("needs")),
        defaults=kw.get("defaults", ""),
    )


def catalog() -> dict[str, MethodInfo]:
    """Every method registered in this package's modules, in display order."""
    found: dict[str, MethodInfo] = {}
    for path in sorted(Path(__file__).parent.glob("*.py")):
        if path.stem in NOT_METHOD_MODULES or path.stem.startswith("_"):
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and (call := _register_call(node)):
                info = _info(node, call)
                found[info.name] = info
    return {name: found[name] for name in display_order(list(found))}
