"""The methods: each module registers its methods with `@register` (see `registry.py`); the
registry imports them on first use, so importing this package costs nothing. The mechanisms
several methods share live once: the dense kernels in `kernels.py`, the gradients of
similarities in `gradients.py`, the class-activation map in `cam.py` (`channel_cam`);
`catalog.py` reads the registrations from the source for `--help` without importing torch.
docs/adding-a-method.md walks through adding one."""

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
