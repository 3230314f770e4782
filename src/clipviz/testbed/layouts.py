"""Scenes of a synthetic world laid out the way real datasets are laid out: Pascal VOC
segmentation, a generic images/masks/boxes folder, an image-caption CSV. Each file is written
to a temporary name and renamed into place. The scenes themselves (pixels, masks, captions)
come from `world.py`; nothing here changes them.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

from ..files import atomic_path, write_text_atomic
from .world import DEFAULT_WORLD, Scene, World, _dilate, make_scenes


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
