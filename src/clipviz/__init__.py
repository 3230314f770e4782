"""clipviz: where a CLIP model looks when it matches an image with a text.

>>> import clipviz
>>> model = clipviz.load_model()                       # ViT-B-16, openai weights
>>> exp = clipviz.explain(model, [image], ["a dog"])   # exp.maps: [B, T, h, w]

Names are imported on first use, so `import clipviz` (and the command line's `--help`) does
not pay for importing torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from .errors import ClipvizError
from .files import package_version

if TYPE_CHECKING:
    from .backend import Backend, Texts, from_open_clip, from_transformers
    from .backend import load_backend as load_model
    from .display import overlay
    from .explanation import Explanation, explain
    from .methods import METHODS

__all__ = [
    "METHODS",
    "Backend",
    "ClipvizError",
    "Explanation",
    "Texts",
    "explain",
    "from_open_clip",
    "from_transformers",
    "load_model",
    "overlay",
]
__version__ = package_version("clipviz") or "0+unknown"

_LAZY = {
    "Backend": ("backend", "Backend"),
    "Texts": ("backend", "Texts"),
    "load_model": ("backend", "load_backend"),
    "from_open_clip": ("backend", "from_open_clip"),
    "from_transformers": ("backend", "from_transformers"),
    "Explanation": ("explanation", "Explanation"),
    "overlay": ("display", "overlay"),
    "explain": ("explanation", "explain"),
    "METHODS": ("methods", "METHODS"),
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'clipviz' has no attribute {name!r}")
    module, attr = _LAZY[name]
    return getattr(import_module(f".{module}", __name__), attr)
