"""A generated "synthetic world": coloured shapes on cluttered backgrounds, with exact masks.

It is the project's scientific test bed. Every scene comes from a seeded
`numpy.random.Generator`, so the same seed gives the same pixels, masks and captions on
every machine. Objects are painted in flat, saturated colours over a muted, textured
background (gradient, noise, stripes, small distractor blobs), so a mask pixel always has
exactly its object's colour and the background is never trivially uniform.

The writers that lay scenes out as datasets (Pascal VOC, a generic images/masks/boxes
folder, an image-caption CSV) live in `layouts.py` and are importable from here too.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (225, 30, 30),
    "green": (30, 175, 45),
    "blue": (40, 70, 235),
    "yellow": (245, 215, 20),
    "purple": (150, 40, 205),
    "cyan": (20, 205, 225),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
# Every "colour shape" combination, colour-major: "red circle", "red square", ...
CLASSES: tuple[str, ...] = tuple(f"{c} {s}" for c in COLOURS for s in SHAPES)

# What other worlds draw their six colours and four shapes from: flat colours far from the
# muted backgrounds' greys, and shapes of similar area for the same radius.
PALETTE: dict[str, tuple[int, int, int]] = {
    **COLOURS,
    "orange": (245, 135, 20),
    "pink": (245, 110, 185),
    "lime": (165, 235, 35),
    "brown": (140, 75, 25),
    "navy": (25, 30, 130),
}
SHAPE_KINDS: tuple[str, ...] = (
    *SHAPES, "cross", "hexagon", "diamond", "pentagon", "crescent",
)  # fmt: skip


@dataclass(frozen=True)
class Background:
    """How a world's backgrounds are drawn (see `_background`): the range of the base grey,
    the tint, the gradient's strength, the chance of stripes and their strength, the noise
    and the number of distractor blobs."""

    grey: tuple[float, float] = (70, 180)
    tint: float = 18
    ramp: tuple[float, float] = (20, 60)
    stripes: float = 0.5
    stripe_strength: tuple[float, float] = (8, 25)
    noise: tuple[float, float] = (4, 16)
    blobs: tuple[int, int] = (2, 8)


@dataclass(frozen=True)
class World:
    """One synthetic world: its colours, shapes and backgrounds. `World.from_seed(0)` is the
    test bed the documentation's figures come from; any other seed draws six colours of
    `PALETTE`, four shapes of `SHAPE_KINDS` and a background style, so a finding can be
    checked on worlds that share nothing but their kind."""

    seed: int
    colours: dict[str, tuple[int, int, int]]
    shapes: tuple[str, ...]
    background: Background

    @classmethod
    def from_seed(cls, seed: int) -> World:
        """The world of `seed` (the same on every machine)."""
        if seed == 0:
            return cls(0, dict(COLOURS), SHAPES, Background())
        rng = np.random.default_rng([seed, 0x5EED])
        names = list(PALETTE)
        colours = sorted(rng.choice(len(names), size=len(COLOURS), replace=False))
        shapes = sorted(rng.choice(len(SHAPE_KINDS), size=len(SHAPES), replace=False))
        lo, hi = float(rng.uniform(50, 95)), float(rng.uniform(150, 200))
        background = Background(
            grey=(lo, hi),
            tint=float(rng.uniform(8, 28)),
            ramp=(float(rng.uniform(10, 30)), float(rng.uniform(40, 80))),
            stripes=float(rng.uniform(0.2, 0.8)),
            stripe_strength=(float(rng.uniform(4, 12)), float(rng.uniform(18, 32))),
            noise=(float(rng.uniform(2, 6)), float(rng.uniform(10, 22))),
            blobs=(int(rng.integers(0, 4)), int(rng.integers(5, 13))),
        )
        return cls(
            seed,
            {names[i]: PALETTE[names[i]] for i in colours},
            tuple(SHAPE_KINDS[i] for i in shapes),
            background,
        )

    @property
    def classes(self) -> tuple[str, ...]:
        """Every "colour shape" combination, colour-major."""
        return tuple(f"{c} {s}" for c in self.colours for s in self.shapes)

    def describe(self) -> str:
        """One line: the seed, colours and shapes."""
        return (
            f"world {self.seed}: colours {', '.join(self.colours)}; shapes {', '.join(self.shapes)}"
        )


DEFAULT_WORLD = World.from_seed(0)

MAX_OBJECTS = 3
# Half-extent of an object as a share of the image side.
MIN_RADIUS, MAX_RADIUS = 0.18, 0.3
# An object may lose at most this share of its area to the objects drawn over it.
MAX_OCCLUDED = 0.2


@dataclass
class SceneObject:
    """One painted object; `mask` holds exactly its visible pixels."""

    shape: str
    colour: str
    mask: np.ndarray  # bool [H, W]
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 of the visible pixels, x1/y1 exclusive

    @property
    def name(self) -> str:
        """The class name, e.g. "red circle"."""
        return f"{self.colour} {self.shape}"


@dataclass
class Scene:
    """An image, its objects in drawing order (later ones on top) and a caption naming them."""

    image: np.ndarray  # uint8 [H, W, 3]
    objects: list[SceneObject]
    caption: str


def class_prompt(name: str) -> str:
    """The text for a class as captions say it: "red circle" -> "a red circle"."""
    return f"a {name}"


def caption_for(names: Sequence[str]) -> str:
    """Join class names into a caption: "a red circle, a blue square and a green star"."""
    phrases = [class_prompt(n) for n in names]
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _polygon(cx: float, cy: float, radii: Sequence[float], start_deg: float) -> list[tuple]:
    step = 360.0 / len(radii)
    pts = []
    for i, r in enumerate(radii):
        a = math.radians(start_deg + i * step)
        pts.append((cx + r * math.cos(a), cy + r * math.sin(a)))
    return pts


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float) -> None:
    # Sizes are chosen so that all shapes cover a similar area for the same r.
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=1)
    elif shape == "square":
        h = 0.9 * r
        draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=1)
    elif shape == "triangle":
        draw.polygon(_polygon(cx, cy + 0.2 * r, [1.25 * r] * 3, -90.0), fill=1)
    elif shape == "star":
        draw.polygon(_polygon(cx, cy + 0.05 * r, [1.15 * r, 0.5 * r] * 5, -90.0), fill=1)
    elif shape == "cross":
        w = 0.36 * r
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=1)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=1)
    elif shape == "hexagon":
        draw.polygon(_polygon(cx, cy, [1.05 * r] * 6, 0.0), fill=1)
    elif shape == "diamond":
        draw.polygon(_polygon(cx, cy, [1.25 * r] * 4, -90.0), fill=1)
    elif shape == "pentagon":
        draw.polygon(_polygon(cx, cy + 0.1 * r, [1.1 * r] * 5, -90.0), fill=1)
    elif shape == "crescent":
        draw.ellipse([cx - 1.1 * r, cy - 1.1 * r, cx + 1.1 * r, cy + 1.1 * r], fill=1)
        draw.ellipse([cx - 0.3 * r, cy - 1.0 * r, cx + 1.5 * r, cy + 0.8 * r], fill=0)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def _shape_mask(shape: str, cx: float, cy: float, r: float, size: int) -> np.ndarray:
    canvas = Image.new("1", (size, size), 0)
    _draw_shape(ImageDraw.Draw(canvas), shape, cx, cy, r)
    return np.array(canvas, dtype=bool)


def _background(rng: np.random.Generator, size: int, style: Background | None = None) -> np.ndarray:
    """A muted, textured background: tinted grey + gradient + stripes + noise + blobs."""
    style = style or Background()
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    grey = rng.uniform(*style.grey)
    tint = rng.uniform(-style.tint, style.tint, 3)
    img = np.empty((size, size, 3), np.float32)
    img[:] = grey + tint
    angle = rng.uniform(0, 2 * math.pi)
    ramp = math.cos(angle) * (xx - 0.5) + math.sin(angle) * (yy - 0.5)
    img += (rng.uniform(*style.ramp) * ramp)[..., None]
    if rng.random() < style.stripes:
        angle = rng.uniform(0, math.pi)
        period = rng.uniform(4, 16) / size
        phase = math.cos(angle) * xx + math.sin(angle) * yy
        img += (rng.uniform(*style.stripe_strength) * np.sin(2 * math.pi * phase / period))[
            ..., None
        ]
    img += rng.uniform(*style.noise) * rng.standard_normal((size, size, 3), dtype=np.float32)
    # Distractor blobs: small, in colours mixed two-thirds of the way towards grey.
    canvas = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(*style.blobs))):
        colour = 0.35 * rng.uniform(0, 255, 3) + 0.65 * grey
        rx, ry = rng.uniform(0.02, 0.06, 2) * size
        cx, cy = rng.uniform(0, size, 2)
        draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=tuple(int(c) for c in colour))
    return np.asarray(canvas).copy()


def _box(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def make_scene(
    rng: np.random.Generator,
    size: int = 64,
    n_objects: int | None = None,
    classes: Sequence[str] | None = None,
    world: World = DEFAULT_WORLD,
) -> Scene:
    """Draw one scene of `world` from `rng`.

    n_objects: how many objects (1..3); random (uniform) when None. The scene may hold
        fewer when they do not fit without heavy occlusion (rare).
    classes: the class names objects are drawn from (distinct within a scene); the
        world's classes when None.
    """
    classes = world.classes if classes is None else classes
    if n_objects is None:
        n_objects = int(rng.integers(1, MAX_OBJECTS + 1))
    if not 1 <= n_objects <= MAX_OBJECTS:
        raise ValueError(f"n_objects must be in 1..{MAX_OBJECTS}, got {n_objects}")
    image = _background(rng, size, world.background)
    n_objects = min(n_objects, len(classes))
    picks = rng.choice(len(classes), size=n_objects, replace=False)
    objects: list[SceneObject] = []  # drawing order; masks hold the visible pixels
    areas: list[int] = []  # each object's area before occlusion
    for k in picks:
        colour, shape = classes[int(k)].split(" ")
        for attempt in range(40):
            # Crowded scenes: later attempts try smaller objects (down to 70 %).
            r = rng.uniform(MIN_RADIUS, MAX_RADIUS) * size * (1 - 0.3 * attempt / 40)
            cx, cy = rng.uniform(1.1 * r + 1, size - 1.1 * r - 1, 2)  # shapes reach 1.1 r
            full = _shape_mask(shape, cx, cy, r, size)
            # The new object goes on top; every earlier one must stay mostly visible, and
            # objects of one colour must not touch (they would merge into one blob).
            visible = [(o.mask & ~full).sum() for o in objects]
            same = [o.mask for o in objects if o.colour == colour]
            if all(v >= (1 - MAX_OCCLUDED) * a for v, a in zip(visible, areas, strict=True)) and (
                not same or not (_dilate(full) & np.any(same, axis=0)).any()
            ):
                break
        else:
            continue  # no room for this one
        for o in objects:
            o.mask &= ~full
        objects.append(SceneObject(shape, colour, full, (0, 0, 0, 0)))
        areas.append(int(full.sum()))
    for o in objects:
        image[o.mask] = world.colours[o.colour]
        o.box = _box(o.mask)
    return Scene(image, objects, caption_for([o.name for o in objects]))


def make_scenes(
    n: int,
    seed: int,
    size: int = 64,
    n_objects: int | None = None,
    world: World = DEFAULT_WORLD,
) -> list[Scene]:
    """`n` scenes of `world` from `numpy.random.default_rng(seed)`; the same arguments give
    the same scenes."""
    rng = np.random.default_rng(seed)
    return [make_scene(rng, size, n_objects, world=world) for _ in range(n)]


def _dilate(mask: np.ndarray) -> np.ndarray:
    """One step of 8-connected dilation (a 3x3 square, done as rows then columns)."""
    rows = mask.copy()
    rows[1:] |= mask[:-1]
    rows[:-1] |= mask[1:]
    out = rows.copy()
    out[:, 1:] |= rows[:, :-1]
    out[:, :-1] |= rows[:, 1:]
    return out


# The dataset writers of `layouts.py` (which builds on this module), read from here too:
# loaded on first use, so the two modules make no import cycle at module level.
_LAYOUTS = frozenset(
    {"scene_id", "voc_labels", "voc_palette", "write_captions_csv", "write_generic", "write_voc"}
)


def __getattr__(name: str) -> Any:
    if name in _LAYOUTS:
        from . import layouts

        return getattr(layouts, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
