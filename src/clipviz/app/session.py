"""What the web app computes, without the web: one model kept loaded, one image explained by
several methods and prompts, re-coloured without recomputing, bundled for download.

Everything here is plain Python over the library (`clipviz.explain`, the method registry,
`clipviz.display.overlay`); `ui.py` only lays it out in Gradio. Errors a user can cause are
`ClipvizError`s with one line of text, which the page shows as they are.
"""

from __future__ import annotations

import html
import io
import threading
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..errors import ClipvizError

# what one request may ask for, so that one user cannot exhaust the machine's memory
DEFAULT_MAX_PIXELS = 40_000_000
DEFAULT_MAX_PROMPTS = 8
DEFAULT_MAX_METHODS = 6
DEFAULT_MAX_CLASS_NAMES = 64  # each name is embedded in 80 templates
COLORMAPS = ("jet", "turbo", "viridis", "inferno", "gray")
TESTBED = "testbed"  # the model name that selects the embedded test bed's tiny CLIP


@dataclass(frozen=True)
class Limits:
    """The most one request may ask for."""

    max_pixels: int = DEFAULT_MAX_PIXELS
    max_prompts: int = DEFAULT_MAX_PROMPTS
    max_methods: int = DEFAULT_MAX_METHODS
    max_class_names: int = DEFAULT_MAX_CLASS_NAMES


@dataclass(frozen=True)
class ModelSpec:
    """Which model to load: an open_clip name with its weights, a `transformers:` folder, or
    `testbed` (the tiny CLIP of the synthetic world, trained and cached on first use)."""

    model: str = TESTBED
    pretrained: str = ""
    model_config: str = ""

    def describe(self) -> str:
        if self.model == TESTBED:
            return "the test bed's tiny CLIP"
        return " ".join(x for x in (self.model, self.pretrained, self.model_config) if x)


class ModelSlot:
    """One loaded model at a time, shared by every request: loaded on first use, kept while
    requests name the same model, replaced when one names another."""

    def __init__(self, device: str = "auto", loader: Callable[[ModelSpec], Any] | None = None):
        self.device = device
        self._loader = loader or self._load
        self._lock = threading.Lock()
        self._spec: ModelSpec | None = None
        self._backend: Any = None

    def get(self, spec: ModelSpec) -> Any:
        with self._lock:
            if self._spec != spec:
                self._backend, self._spec = None, None  # free the old model before loading
                self._backend, self._spec = self._loader(spec), spec
            return self._backend

    @property
    def loaded(self) -> ModelSpec | None:
        return self._spec

    def _load(self, spec: ModelSpec) -> Any:
        from ..backend import load_backend

        if spec.model == TESTBED and not spec.pretrained and not spec.model_config:
            from ..testbed.tinyclip import ensure_tiny_clip
            from .examples import testbed_cache

            tiny = ensure_tiny_clip(testbed_cache())
            return load_backend(
                model_config=tiny.config_path, pretrained=str(tiny.weights_path), device=self.device
            )
        return load_backend(
            spec.model or None,
            spec.pretrained or None,
            spec.model_config or None,
            device=self.device,
        )


def parse_prompts(text: str, limits: Limits) -> list[str]:
    """One prompt per line (blank lines skipped), checked like the command line's."""
    from ..explanation import check_prompt_text

    prompts = [line.strip() for line in (text or "").splitlines() if line.strip()]
    if not prompts:
        raise ClipvizError("no prompt given; write one prompt per line")
    if len(prompts) > limits.max_prompts:
        raise ClipvizError(
            f"{len(prompts)} prompts given; this app takes at most {limits.max_prompts} per "
            "request (clipviz app --max-prompts)"
        )
    check_prompt_text(prompts)
    return prompts


def check_image(image: Image.Image | None, limits: Limits) -> Image.Image:
    """The uploaded image in RGB, refused when missing or larger than the pixel cap."""
    if image is None:
        raise ClipvizError("no image given; drop, paste or pick an image first")
    if image.width * image.height > limits.max_pixels:
        raise ClipvizError(
            f"the image has {image.width}x{image.height} pixels, more than this app's cap of "
            f"{limits.max_pixels:,} (clipviz app --max-pixels); use a smaller image"
        )
    from ..data.images import to_rgb

    return to_rgb(image)


def parse_options(method: str, values: dict[str, Any]) -> dict[str, Any]:
    """A method's options from the page's widgets: text fields left empty keep the default,
    others are read as on the command line (`-O key=value`)."""
    from ..methods import get_method

    info = get_method(method).info
    given: dict[str, Any] = {}
    for name, value in values.items():
        if value is None or (isinstance(value, str) and not value.strip()):
            continue
        opt = info.option(name)
        if isinstance(value, str):
            given[name] = value.strip()
        elif value != opt.default:
            given[name] = str(value).lower() if isinstance(value, bool) else str(value)
    return info.bind(given, from_text=True)


@dataclass
class Cell:
    """One (method, prompt) of the grid: the map at the image's size and the probability."""

    method: str
    prompt: str
    norm: np.ndarray  # [H, W] in [0, 1], NaN outside the part of the image the model saw
    raw: np.ndarray  # [h, w] the method's raw map
    prob: float


@dataclass
class Result:
    """One image explained by several methods for several prompts."""

    image: np.ndarray  # [H, W, 3] uint8
    prompts: list[str]
    methods: list[str]
    cells: list[Cell] = field(default_factory=list)
    # Grad-ECLIP's token importance per prompt: (tokens, weights)
    token_weights: dict[str, list[tuple[list[str], list[float]]]] = field(default_factory=dict)
    # TextSpan's per-head maps: method -> [T, heads, H, W] normalised, and the heads' names
    head_maps: dict[str, tuple[np.ndarray, list[str]]] = field(default_factory=dict)
    # the (colormap, alpha, head prompt) the page shows it with: drawing the same again would
    # rewrite the same content-addressed files while the browser may still be reading them
    shown: tuple[str, float, str] | None = None

    def cell(self, method: str, prompt: str) -> Cell:
        return next(c for c in self.cells if c.method == method and c.prompt == prompt)


def _display_maps(exp: Any, maps: Any, size: tuple[int, int]) -> np.ndarray:
    """Maps `[K, h, w]` of image 0 normalised and placed as the overlay shows them."""
    from ..maps import place_in_box

    box = exp.shown.box(0) if exp.shown is not None else (0, 0, size[1], size[0])
    return place_in_box(maps, box, size).numpy()


def explain_image(
    backend: Any,
    image: Image.Image,
    prompts: Sequence[str],
    methods: Sequence[str],
    options: dict[str, dict[str, Any]] | None = None,
    limits: Limits = Limits(),
    ensemble: bool = True,
) -> Result:
    """Every method's maps of `image` for every prompt, with the model's probabilities."""
    from ..explanation import explain
    from ..methods import check_methods

    if not methods:
        raise ClipvizError("no method chosen; tick at least one method")
    if len(methods) > limits.max_methods:
        raise ClipvizError(
            f"{len(methods)} methods chosen; this app runs at most {limits.max_methods} per "
            "request (clipviz app --max-methods)"
        )
    check_methods(backend, list(methods))
    texts = backend.encode_texts(list(prompts), ensemble=ensemble)
    arr = np.asarray(image)
    result = Result(arr, list(prompts), list(methods))
    size = (arr.shape[0], arr.shape[1])
    for method in methods:
        exp = explain(backend, [image], texts, method, options=(options or {}).get(method))
        norm = _display_maps(exp, exp.maps[0], size)
        for t, prompt in enumerate(prompts):
            result.cells.append(
                Cell(method, prompt, norm[t], exp.maps[0, t].numpy(), float(exp.probs[0, t]))
            )
        if "text_importance" in exp.extras:
            tokens = exp.labels.get("text_tokens", [[] for _ in prompts])
            weights = exp.extras["text_importance"][0].tolist()
            result.token_weights[method] = [
                (list(tok), [float(w) for w in weight[: len(tok)]])
                for tok, weight in zip(tokens, weights, strict=True)
            ]
        if "head_maps" in exp.extras:
            heads = exp.extras["head_maps"][0]  # [T, heads, h, w]
            t, k = heads.shape[:2]
            placed = _display_maps(exp, heads.reshape(t * k, *heads.shape[2:]), size)
            names = exp.labels.get("heads", [[str(i) for i in range(k)]])[0]
            result.head_maps[method] = (placed.reshape(t, k, *size), list(names))
    return result


def colour(result: Result, norm: np.ndarray, colormap: str, alpha: float) -> Image.Image:
    """A map over the result's image, as the command line's overlay PNG draws it."""
    from ..render import blend_heatmap

    if colormap not in COLORMAPS:
        raise ClipvizError(f"colormap {colormap!r} unknown; choose one of {', '.join(COLORMAPS)}")
    return Image.fromarray(blend_heatmap(result.image, norm, colormap, float(alpha)))


def grid(result: Result, colormap: str, alpha: float) -> list[tuple[Image.Image, str]]:
    """The comparison grid, row by row: one row per prompt, one column per method, each
    captioned with the method, the prompt and the model's probability."""
    return [
        (
            colour(result, result.cell(m, p).norm, colormap, alpha),
            f"{m} · {p} · p={result.cell(m, p).prob:.2f}",
        )
        for p in result.prompts
        for m in result.methods
    ]


def probability_rows(result: Result) -> list[list[Any]]:
    """Rows of (prompt, probability): the model's own probabilities (one per prompt; every
    method of a run shares them)."""
    first = result.methods[0]
    return [[p, round(result.cell(first, p).prob, 4)] for p in result.prompts]


def token_weights_html(result: Result) -> str:
    """Grad-ECLIP's token importance drawn over each prompt's words (escaped HTML)."""
    parts = []
    for method, rows in result.token_weights.items():
        for prompt, (tokens, weights) in zip(result.prompts, rows, strict=True):
            top = max((w for w in weights), default=0.0) or 1.0
            spans = "".join(
                f'<span title="{w:.3f}" style="background: rgba(255, 80, 0, '
                f'{max(w, 0.0) / top:.2f}); padding: 0 2px">{html.escape(tok)}</span> '
                for tok, w in zip(tokens, weights, strict=True)
            )
            parts.append(f"<p><b>{html.escape(method)}</b> · {html.escape(prompt)}: {spans}</p>")
    return "".join(parts)


def head_gallery(
    result: Result, prompt: str | None, colormap: str, alpha: float, limit: int = 48
) -> list[tuple[Image.Image, str]]:
    """TextSpan's per-head maps of one prompt (the first when none is chosen)."""
    out: list[tuple[Image.Image, str]] = []
    for method, (maps, names) in result.head_maps.items():
        t = result.prompts.index(prompt) if prompt in result.prompts else 0
        for k, name in enumerate(names[:limit]):
            out.append((colour(result, maps[t, k], colormap, alpha), f"{method} · head {name}"))
    return out


def bundle(result: Result, folder: Path, colormap: str, alpha: float) -> Path:
    """A zip of the raw maps (`maps.npz`: one `[T, h, w]` array per method, the prompts and
    the probabilities) and every overlay PNG, written into `folder`."""
    from ..render import prompt_slugs

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "clipviz-maps.zip"
    arrays: dict[str, np.ndarray] = {"prompts": np.array(result.prompts)}
    for m in result.methods:
        arrays[m] = np.stack([result.cell(m, p).raw for p in result.prompts])
        arrays[f"{m}.probs"] = np.array([result.cell(m, p).prob for p in result.prompts])
    npz = io.BytesIO()
    np.savez(npz, **arrays)  # type: ignore[arg-type]
    slugs = prompt_slugs(result.prompts)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("maps.npz", npz.getvalue())
        for m in result.methods:
            for p, slug in zip(result.prompts, slugs, strict=True):
                png = io.BytesIO()
                colour(result, result.cell(m, p).norm, colormap, alpha).save(png, "PNG")
                zf.writestr(f"{m}/{slug}.png", png.getvalue())
    return path


def layer_methods() -> list[str]:
    """The methods with a `layer` option: their map can be drawn at every block."""
    from ..methods import METHODS

    return [name for name, m in METHODS.items() if any(o.name == "layer" for o in m.options)]


def layer_sweep(
    backend: Any, image: Image.Image, prompt: str, method: str, ensemble: bool = True
) -> list[tuple[np.ndarray, str]]:
    """One method's map at every layer of the image tower, first to last, as (normalised
    map at the image's size, caption)."""
    from ..explanation import explain

    if method not in layer_methods():
        raise ClipvizError(
            f"{method} has no layer option; compare the layers of {', '.join(layer_methods())}"
        )
    texts = backend.encode_texts([prompt], ensemble=ensemble)
    size = (image.height, image.width)
    depth = int(backend.vision.depth)
    out = []
    for layer in range(depth):
        exp = explain(backend, [image], texts, method, options={"layer": layer})
        out.append((_display_maps(exp, exp.maps[0], size)[0], f"{method} · layer {layer}"))
    return out


def discover_concepts(
    backend: Any, image: Image.Image, top: int, colormap: str, alpha: float
) -> tuple[list[list[Any]], list[tuple[Image.Image, str]]]:
    """ConVis's discovery (the grid variant): the `top` WordNet concepts whose best window
    ranks lowest, as table rows (synset, lemma, definition, best rank) and their maps over
    the centre square that ConVis reads."""
    import torch.nn.functional as F

    from ..convis.maps import concept_maps, minmax
    from ..convis.nouns import noun_database

    if not 1 <= top <= 20:
        raise ClipvizError(f"top={top}: ask for 1 to 20 concepts")
    found = concept_maps(backend, image, top=top)
    square = Result(found.square, [], [])
    maps = F.interpolate(
        minmax(found.maps)[None], size=found.square.shape[:2], mode="bilinear", align_corners=False
    )[0].numpy()
    db = noun_database()
    rows, shown = [], []
    for k, (name, best) in enumerate(zip(found.concepts, found.best_ranks, strict=True)):
        i = db.position[name]
        rows.append([name, db.lemmas[i][0].replace("_", " "), db.definitions[i], best])
        shown.append((colour(square, maps[k], colormap, alpha), name))
    return rows, shown
