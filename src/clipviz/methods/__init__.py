"""The methods: each module registers its methods with `@register` (see `registry.py`); the
registry imports them on first use, so importing this package costs nothing."""

from __future__ import annotations

from typing import Any

from .registry import (
    MapResult,
    Method,
    MethodInfo,
    Option,
    check_methods,
    get_method,
    method_options,
    methods,
    register,
)

__all__ = [
    "METHODS",
    "MapResult",
    "Method",
    "MethodInfo",
    "Option",
    "check_methods",
    "get_method",
    "method_options",
    "methods",
    "register",
]


def __getattr__(name: str) -> Any:
    if name == "METHODS":  # every registered method by name, imported on first access
        return methods()
    raise AttributeError(name)
