"""clipviz: where a CLIP model looks when it matches an image with a text.

>>> import clipviz
>>> model = clipviz.load_model()                       # ViT-B-16, openai weights
>>> exp = clipviz.explain(model, [image], ["a dog"])   # exp.maps: [B, T, h, w]
"""

from .backend import Backend, Texts
from .errors import ClipvizError
from .explain import Explanation, explain
from .loading import load_backend as load_model
from .methods import METHODS

__all__ = ["METHODS", "Backend", "ClipvizError", "Explanation", "Texts", "explain", "load_model"]
__version__ = "0.1.0"
