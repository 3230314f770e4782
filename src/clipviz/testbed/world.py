"""A generated "synthetic world": coloured shapes on cluttered backgrounds, with exact masks.

It is the project's scientific test bed. Every scene comes from a seeded
`numpy.random.Generator`, so the same seed gives the same pixels, masks and captions on
every machine. Objects are painted in flat, saturated colours over a muted, textured
background (gradient, noise, stripes, small distractor blobs), so a mask pixel always has
exactly its object's colour and the background is never trivially uniform.

Writers lay scenes out the way real datasets are laid out (Pascal VOC segmentation, a
generic images/masks/boxes folder, an image-caption CSV), each file written to a temporary
name and renamed into place.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..files import atomic_path, write_text_atomic

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


def scene_id(i: int) -> str:
    """The file stem of the i-th scene a writer writes."""
    return f"synth_{i:05d}"


def _save_png(path: Path, image: Image.Image) -> None:
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def voc_palette() -> list[int]:
    """Pascal VOC's 256-entry colour map, flattened (r, g, b, r, g, b, ...)."""
    palette = []
    for label in range(256):
        r = g = b = 0
        c = label
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette += [r, g, b]
    return palette


def voc_labels(scene: Scene, world: World = DEFAULT_WORLD) -> np.ndarray:
    """The VOC label image of a scene: uint8 [H, W], 0 background, 1 + index in the world's
    classes.

    Like real VOC, a 1-pixel band (label 255, "ignore") runs along every object's outline,
    on the outside: over the background or over the object underneath, never over the
    object itself, so every non-255 pixel agrees with the masks.
    """
    classes = world.classes
    labels = np.zeros(scene.image.shape[:2], np.uint8)
    band = np.zeros(labels.shape, bool)
    above = np.zeros(labels.shape, bool)
    for obj in reversed(scene.objects):  # topmost first
        labels[obj.mask] = 1 + classes.index(obj.name)
        band |= _dilate(obj.mask) & ~obj.mask & ~above
        above |= obj.mask
    labels[band] = 255
    return labels


def _dilate(mask: np.ndarray) -> np.ndarray:
    """One step of 8-connected dilation (a 3x3 square, done as rows then columns)."""
    rows = mask.copy()
    rows[1:] |= mask[:-1]
    rows[:-1] |= mask[1:]
    out = rows.copy()
    out[:, 1:] |= rows[:, :-1]
    out[:, :-1] |= rows[:, 1:]
    return out


def write_voc(
    root: str | os.PathLike, n: int, seed: int, size: int = 64, world: World = DEFAULT_WORLD
) -> list[Scene]:
    """Write `n` scenes in Pascal VOC segmentation layout under `root`; return them.

    Images go to `JPEGImages/<id>.png` (PNG, not JPEG: lossless, so colours stay exact),
    labels to `SegmentationClass/<id>.png` (palette PNG, see `voc_labels`), ids to
    `ImageSets/Segmentation/val.txt`, and `classes.txt` lists "background" then the world's
    classes.
    """
    root = Path(root)
    scenes = make_scenes(n, seed, size, world=world)
    for i, scene in enumerate(scenes):
        sid = scene_id(i)
        _save_png(root / "JPEGImages" / f"{sid}.png", Image.fromarray(scene.image))
        label_img = Image.fromarray(voc_labels(scene, world), mode="P")
        label_img.putpalette(voc_palette())
        _save_png(root / "SegmentationClass" / f"{sid}.png", label_img)
    ids = "".join(f"{scene_id(i)}\n" for i in range(n))
    write_text_atomic(root / "ImageSets" / "Segmentation" / "val.txt", ids)
    names = ("background", *world.classes)
    write_text_atomic(root / "classes.txt", "".join(f"{c}\n" for c in names))
    return scenes


def write_generic(
    root: str | os.PathLike, n: int, seed: int, size: int = 64, world: World = DEFAULT_WORLD
) -> list[Scene]:
    """Write `n` scenes as `images/<stem>.png`, `masks/<stem>/<class>.png`, `boxes.json`.

    Masks are 0/255 "L" PNGs named by the class name as it is, space included
    ("masks/synth_00000/red circle.png"). `boxes.json` maps "<stem>.png" to
    {class: [[x0, y0, x1, y1], ...]} (visible pixels, x1/y1 exclusive).
    """
    root = Path(root)
    scenes = make_scenes(n, seed, size, world=world)
    boxes: dict[str, dict[str, list[list[int]]]] = {}
    for i, scene in enumerate(scenes):
        sid = scene_id(i)
        _save_png(root / "images" / f"{sid}.png", Image.fromarray(scene.image))
        for obj in scene.objects:
            mask = Image.fromarray(obj.mask.astype(np.uint8) * 255, mode="L")
            _save_png(root / "masks" / sid / f"{obj.name}.png", mask)
        boxes[f"{sid}.png"] = {o.name: [list(o.box)] for o in scene.objects}
    write_text_atomic(root / "boxes.json", json.dumps(boxes, indent=1) + "\n")
    return scenes


def write_captions_csv(
    root: str | os.PathLike, n: int, seed: int, size: int = 64, world: World = DEFAULT_WORLD
) -> list[Scene]:
    """Write `n` scenes as `images/<stem>.png` and `captions.csv` (`filepath,caption`).

    File paths in the CSV are relative to the CSV's folder (`images/synth_00000.png`).
    """
    root = Path(root)
    scenes = make_scenes(n, seed, size, world=world)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["filepath", "caption"])
    for i, scene in enumerate(scenes):
        rel = f"images/{scene_id(i)}.png"
        _save_png(root / rel, Image.fromarray(scene.image))
        writer.writerow([rel, scene.caption])
    write_text_atomic(root / "captions.csv", buf.getvalue())
    return scenes
