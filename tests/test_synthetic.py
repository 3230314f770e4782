"""The synthetic world is exact and reproducible, its writers round-trip, and the tiny CLIP
trainer learns and is deterministic (a few steps only; the full model is a separate fixture)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from clipviz.testbed import tinyclip
from clipviz.testbed import world as synthetic
from clipviz.testbed.world import CLASSES, COLOURS, make_scenes


def _dilate(mask: np.ndarray) -> np.ndarray:
    padded = np.pad(mask, 1)
    h, w = mask.shape
    return np.any([padded[y : y + h, x : x + w] for y in range(3) for x in range(3)], axis=0)


WORLDS = [synthetic.World.from_seed(s) for s in (0, 1, 4)]  # 4: navy, brown, crescents


@pytest.fixture(scope="module", params=WORLDS, ids=lambda w: f"world{w.seed}")
def world(request) -> synthetic.World:
    return request.param


@pytest.fixture(scope="module")
def scenes(world) -> list[synthetic.Scene]:
    return make_scenes(60, seed=3, size=64, world=world)


def test_same_seed_gives_identical_scenes_and_another_seed_differs():
    a, b, c = make_scenes(5, seed=1), make_scenes(5, seed=1), make_scenes(5, seed=2)
    for x, y in zip(a, b, strict=True):
        assert np.array_equal(x.image, y.image) and x.caption == y.caption
        for ox, oy in zip(x.objects, y.objects, strict=True):
            assert np.array_equal(ox.mask, oy.mask) and ox.box == oy.box
    assert not np.array_equal(np.stack([s.image for s in a]), np.stack([s.image for s in c]))


def test_mask_pixels_have_exactly_their_objects_colour(world, scenes):
    for scene in scenes:
        for obj in scene.objects:
            assert obj.mask.sum() > 20 and obj.name in world.classes
            assert (scene.image[obj.mask] == world.colours[obj.colour]).all()


def test_masks_are_disjoint_and_other_pixels_never_take_an_object_colour(world, scenes):
    touching = 0
    for scene in scenes:
        union = np.zeros(scene.image.shape[:2], bool)
        for i, obj in enumerate(scene.objects):
            assert not (union & obj.mask).any()
            for other in scene.objects[:i]:  # one colour never merges into one blob
                assert other.colour != obj.colour or not (_dilate(other.mask) & obj.mask).any()
            touching += bool((_dilate(union) & obj.mask).any())
            union |= obj.mask
        for obj in scene.objects:
            # An occluded part of an object must not be left in its mask or outside all masks.
            same = (scene.image == world.colours[obj.colour]).all(axis=-1)
            assert not (same & ~union).any()
    assert touching > 0  # some scenes do exercise occlusion / contact


def test_boxes_enclose_the_visible_pixels(scenes):
    for scene in scenes:
        for obj in scene.objects:
            ys, xs = np.nonzero(obj.mask)
            assert obj.box == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)


def test_caption_names_every_object_in_drawing_order(scenes):
    for scene in scenes:
        names = [o.name for o in scene.objects]
        assert len(set(names)) == len(names)
        assert scene.caption == synthetic.caption_for(names)
        positions = [scene.caption.index(synthetic.class_prompt(n)) for n in names]
        assert positions == sorted(positions)
    assert synthetic.caption_for(["red circle", "blue square", "green star"]) == (
        "a red circle, a blue square and a green star"
    )
    assert {len(s.objects) for s in scenes} == {1, 2, 3}


def test_classes_are_every_colour_with_every_shape():
    assert len(CLASSES) == len(COLOURS) * len(synthetic.SHAPES) == len(set(CLASSES))
    assert "red circle" in CLASSES and synthetic.class_prompt("red circle") == "a red circle"


def test_world_zero_is_the_test_bed_and_other_seeds_draw_their_own_worlds():
    zero = synthetic.World.from_seed(0)
    assert zero.classes == CLASSES and zero.colours == COLOURS
    assert zero.background == synthetic.Background()
    # the module's functions draw world 0: the same scenes with or without it
    a, b = make_scenes(3, seed=5), make_scenes(3, seed=5, world=zero)
    assert all(np.array_equal(x.image, y.image) for x, y in zip(a, b, strict=True))
    others = [synthetic.World.from_seed(s) for s in range(1, 6)]
    assert synthetic.World.from_seed(3) == others[2]  # the same on every call
    for w in others:
        assert len(w.colours) == 6 and len(w.shapes) == 4
        assert set(w.colours) <= set(synthetic.PALETTE)
        assert set(w.shapes) <= set(synthetic.SHAPE_KINDS)
        assert len(w.classes) == 24 == len(set(w.classes))
        lo, hi = w.background.grey
        assert 50 <= lo < hi <= 200
    # the worlds differ from the test bed and from each other
    assert len({(tuple(w.colours), w.shapes) for w in [zero, *others]}) == 6
    assert any(set(w.shapes) - set(synthetic.SHAPES) for w in others)
    assert any(set(w.colours) - set(COLOURS) for w in others)


@pytest.mark.parametrize("shape", synthetic.SHAPE_KINDS)
def test_every_shape_kind_covers_a_similar_area(shape):
    circle = synthetic._shape_mask("circle", 32, 32, 12, 64).sum()
    area = synthetic._shape_mask(shape, 32, 32, 12, 64).sum()
    assert 0.5 * circle <= area <= 1.05 * circle


@pytest.mark.parametrize("size", [32, 96, 128])
def test_other_sizes_keep_objects_inside(size):
    scenes = make_scenes(8, seed=0, size=size, n_objects=3)
    assert np.mean([len(s.objects) for s in scenes]) >= 2.5  # fewer only when crowded
    for scene in scenes:
        assert scene.image.shape == (size, size, 3) and scene.image.dtype == np.uint8
        for obj in scene.objects:
            assert obj.mask.shape == (size, size) and obj.mask.any()


def test_background_is_textured_not_uniform():
    scene = make_scenes(1, seed=0, n_objects=1)[0]
    background = scene.image[~scene.objects[0].mask].astype(float)
    assert background.std(axis=0).min() > 4


@pytest.mark.parametrize("seed", [0, 2])
def test_voc_writer_round_trips_labels_with_an_ignore_band(tmp_path, seed):
    world = synthetic.World.from_seed(seed)
    written = synthetic.write_voc(tmp_path, 6, seed=5, size=64, world=world)
    names = (tmp_path / "classes.txt").read_text().splitlines()
    assert names == ["background", *world.classes]
    ids = (tmp_path / "ImageSets" / "Segmentation" / "val.txt").read_text().split()
    assert ids == [synthetic.scene_id(i) for i in range(6)]
    for sid, scene in zip(ids, written, strict=True):
        image = np.asarray(Image.open(tmp_path / "JPEGImages" / f"{sid}.png").convert("RGB"))
        assert np.array_equal(image, scene.image)  # PNG: exact colours
        label_img = Image.open(tmp_path / "SegmentationClass" / f"{sid}.png")
        assert label_img.mode == "P"
        labels = np.asarray(label_img)
        expected = np.zeros(labels.shape, np.uint8)
        for obj in scene.objects:
            expected[obj.mask] = names.index(obj.name)
        band = labels == 255
        assert band.any()
        assert np.array_equal(labels[~band], expected[~band])
        # The band is one pixel wide and hugs an outline: each band pixel has a neighbour of
        # another label, and no object pixel on top loses its label to it.
        edges = np.zeros(labels.shape, bool)
        for obj in scene.objects:
            edges |= _dilate(obj.mask) & ~obj.mask
        assert not (band & ~edges).any()
        assert (labels == names.index(scene.objects[-1].name)).sum() == scene.objects[-1].mask.sum()
    assert not list(tmp_path.rglob(".*"))  # no temporary files left behind


def test_generic_writer_writes_masks_and_boxes(tmp_path):
    written = synthetic.write_generic(tmp_path, 4, seed=2, size=64)
    boxes = json.loads((tmp_path / "boxes.json").read_text())
    for i, scene in enumerate(written):
        stem = synthetic.scene_id(i)
        image = np.asarray(Image.open(tmp_path / "images" / f"{stem}.png"))
        assert np.array_equal(image, scene.image)
        assert sorted(p.stem for p in (tmp_path / "masks" / stem).iterdir()) == sorted(
            o.name for o in scene.objects
        )
        for obj in scene.objects:
            mask = np.asarray(Image.open(tmp_path / "masks" / stem / f"{obj.name}.png"))
            assert set(np.unique(mask)) <= {0, 255}
            assert np.array_equal(mask == 255, obj.mask)
            assert boxes[f"{stem}.png"][obj.name] == [list(obj.box)]


def test_captions_csv_lists_relative_paths_and_captions(tmp_path):
    written = synthetic.write_captions_csv(tmp_path, 3, seed=4, size=64)
    with open(tmp_path / "captions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["caption"] for r in rows] == [s.caption for s in written]
    for row, scene in zip(rows, written, strict=True):
        assert not row["filepath"].startswith("/")
        assert np.array_equal(np.asarray(Image.open(tmp_path / row["filepath"])), scene.image)


@pytest.mark.open_clip
def test_tiny_clip_loss_falls_within_thirty_steps(tmp_path, one_thread):
    losses: list[float] = []
    tiny = tinyclip.train_tiny_clip(
        tmp_path,
        steps=30,
        batch_size=8,
        pool_size=24,
        progress=lambda step, total, loss: losses.append(loss),
    )
    assert len(losses) == 30
    assert np.mean(losses[-5:]) < 0.75 * np.mean(losses[:5])
    # Loads back through open_clip's own path (config registered by file, weights by path).
    model = tiny.load()
    saved = load_file(str(tiny.weights_path))
    for key, value in model.state_dict().items():
        assert torch.equal(value, saved[key]), key
    assert json.loads(tiny.config_path.read_text()) == tinyclip.TINY_CLIP_CONFIG


def test_tiny_clip_weights_are_deterministic_for_a_seed(tmp_path, one_thread):
    def weights(seed: int, name: str) -> dict[str, torch.Tensor]:
        tiny = tinyclip.train_tiny_clip(
            tmp_path / name, steps=2, seed=seed, batch_size=4, pool_size=8
        )
        return load_file(str(tiny.weights_path))

    a, b, c = weights(0, "a"), weights(0, "b"), weights(1, "c")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["visual.proj"], c["visual.proj"])


def test_ensure_tiny_clip_trains_once_per_key(tmp_path, monkeypatch, one_thread):
    monkeypatch.setattr(tinyclip, "POOL_SIZE", 8)
    calls: list[int] = []
    first = tinyclip.ensure_tiny_clip(
        tmp_path, steps=1, progress=lambda step, total, loss: calls.append(step)
    )
    again = tinyclip.ensure_tiny_clip(
        tmp_path, steps=1, progress=lambda step, total, loss: calls.append(step)
    )
    assert calls == [1] and first == again and first.weights_path.is_file()
    assert first.config_path.parent.name == f"tinyclip-{tinyclip.cache_key(steps=1)}"
    assert tinyclip.cache_key(steps=1) != tinyclip.cache_key(steps=2)
    assert [p.name for p in tmp_path.iterdir()] == [first.config_path.parent.name]


def test_tiny_siglip_trains_with_the_sigmoid_loss_and_loads_the_users_way(tmp_path, one_thread):
    from clipviz.backend import load_backend
    from clipviz.testbed import tinysiglip

    losses: list[float] = []
    tiny = tinysiglip.train_tiny_siglip(
        tmp_path, steps=30, batch_size=8, pool_size=24,
        progress=lambda step, total, loss: losses.append(loss),
    )  # fmt: skip
    assert len(losses) == 30
    assert np.mean(losses[-5:]) < 0.75 * np.mean(losses[:5])
    assert losses[0] > 8 * 0.5  # SigLIP's start (t = 10, b = −10): about 10 per image, not ln 8
    b = load_backend(model_config=tiny.config_path, pretrained=str(tiny.weights_path))
    assert b.family == "timm VisionTransformer, map head" and b.logit_bias is not None
    assert b.grid_size(torch.zeros(1, 3, 128, 128)) == (8, 8)
    assert json.loads(tiny.config_path.read_text()) == tinysiglip.TINY_SIGLIP_CONFIG
    key = tinysiglip.cache_key(steps=1)
    assert key != tinysiglip.cache_key(steps=2) and key != tinyclip.cache_key(steps=1)


def test_cache_keys_ignore_docstrings_and_comments_but_not_code():
    a = 'def f():\n    """One."""\n    return 1  # a comment\n'
    b = '"""A module."""\ndef f():\n    """Two."""\n    return 1\n'
    assert tinyclip.code_text(a) == tinyclip.code_text(b.split("\n", 1)[1])
    assert tinyclip.code_text(a) != tinyclip.code_text(a.replace("return 1", "return 2"))


def test_a_worlds_models_train_on_its_fixed_thread_count(monkeypatch):
    seen = []

    def pool(*args):  # the first thing fit does under its thread count
        seen.append(torch.get_num_threads())
        raise StopIteration

    monkeypatch.setattr(tinyclip, "training_pool", pool)
    before = torch.get_num_threads()
    model = tinyclip.build_model()
    for seed in (0, 3):
        with pytest.raises(StopIteration):
            tinyclip.fit(model, None, 1, 1, 1, 64, None, None, None, "x",
                         synthetic.World.from_seed(seed))  # fmt: skip
    assert seen == [2, 1] and torch.get_num_threads() == before
