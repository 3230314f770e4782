"""The explain pipeline: writer threads behind a bounded queue give the same outputs and the
same manifest as writing in the model's thread; the PNG encoder and the colour tables."""

from __future__ import annotations

import io
import json
import threading
import time

import numpy as np
import pytest
import torch
from conftest import random_image
from PIL import Image

from clipviz.data.inputs import collect_inputs
from clipviz.render import blend_heatmap, colorize, encode_png, map_levels
from clipviz.runs.explain import run_explain
from clipviz.runs.manifest import MANIFEST
from clipviz.runs.outputs import map_bytes
from clipviz.runs.writers import OrderedWriters


@pytest.mark.parametrize("shape", [(7, 9), (7, 9, 3), (7, 9, 4), (1, 1, 3), (300, 2, 3)])
def test_png_encoder_round_trips_through_pillow(shape):
    pixels = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    decoded = np.asarray(Image.open(io.BytesIO(encode_png(pixels))))
    np.testing.assert_array_equal(decoded, pixels)


def test_a_palette_png_shows_the_colours_of_its_indices():
    levels = np.random.default_rng(1).integers(0, 256, (20, 30), dtype=np.uint8)
    palette = np.random.default_rng(2).integers(0, 256, (256, 3), dtype=np.uint8)
    image = Image.open(io.BytesIO(encode_png(levels, palette=palette)))
    assert image.mode == "P"
    np.testing.assert_array_equal(np.asarray(image.convert("RGB")), palette[levels])


def test_encoder_refuses_what_png_cannot_hold():
    with pytest.raises(ValueError, match="uint8"):
        encode_png(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(ValueError, match="palette"):
        encode_png(np.zeros((4, 4, 3), np.uint8), palette=np.zeros((4, 3), np.uint8))


def test_overlay_is_the_fixed_point_blend_of_image_and_heatmap():
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (16, 12, 3), dtype=np.uint8)
    norm = rng.random((16, 12))
    norm[0, :4] = np.nan
    for alpha in (0.0, 0.3, 0.5, 1.0):
        heat = colorize(np.nan_to_num(norm), "turbo")[..., :3].astype(np.int64)
        w = round(alpha * 256)
        expected = ((256 - w) * image.astype(np.int64) + w * heat + 128) // 256
        expected[0, :4] = image[0, :4]  # no data: the photo as it is
        np.testing.assert_array_equal(blend_heatmap(image, norm, "turbo", alpha), expected)
        # within one level of the exact (1-α)·image + α·heat
        exact = (1 - alpha) * image + alpha * heat
        assert np.abs(blend_heatmap(image, norm, "turbo", alpha)[1:] - exact[1:]).max() <= 1.0


def test_levels_and_map_bytes_of_nan_and_the_ends():
    t = np.array([0.0, 1 / 256, 0.5, 0.999, 1.0, np.nan, -0.5, 1.5])
    assert map_levels(t).tolist() == [0, 1, 128, 255, 255, 0, 0, 255]
    assert map_bytes(t[:6]).tolist() == [0, 1, 128, 255, 255, 0]


def test_writers_hand_results_on_in_the_order_given():
    got: list[int] = []
    in_flight, most = [0], [0]
    lock = threading.Lock()

    def job(i: int) -> int:
        with lock:
            in_flight[0] += 1
            most[0] = max(most[0], in_flight[0])
        time.sleep(0.002 * (7 - i % 7))  # later jobs finish first
        with lock:
            in_flight[0] -= 1
        return i

    with OrderedWriters(3, got.append, max_pending=4) as pool:
        for i in range(30):
            if i % 5 == 0:
                pool.put(-i)  # a result with no work keeps its place
            else:
                pool.submit(job, i)
    assert got == [-i if i % 5 == 0 else i for i in range(30)]
    assert most[0] <= 3


def test_a_failing_job_raises_after_the_results_before_it():
    got: list[int] = []

    def job(i: int) -> int:
        if i == 3:
            raise OSError("disk on fire")
        return i

    with pytest.raises(OSError, match="disk on fire"), OrderedWriters(2, got.append) as pool:
        for i in range(6):
            pool.submit(job, i)
    assert got[:3] == [0, 1, 2] and 3 not in got


def _run(folder, backend, out, writers, workers=0):
    items, _ = collect_inputs([str(folder)])
    texts = backend.encode_texts(["a red square", "noise"], ensemble=False)
    return run_explain(
        backend, items, texts, out, methods=("itsm", "surgery"), batch_size=2, workers=workers,
        writers=writers,
    )  # fmt: skip


def _outputs(out):
    return {
        str(p.relative_to(out)): p.read_bytes()
        for p in out.rglob("*")
        if p.is_file() and p.name not in (MANIFEST, "run.json", ".clipviz.lock")
    }


@pytest.mark.parametrize("room", [True, False])
def test_decoding_workers_hand_photos_over_in_shared_memory_or_pipes_alike(
    tmp_path, vit_backend, monkeypatch, room
):
    from clipviz.runs import decode

    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(3):
        random_image(i, (80 + 8 * i, 48)).save(folder / f"{i}.png")
    inline = _run(folder, vit_backend, tmp_path / "inline", writers=0)
    monkeypatch.setattr(decode, "shared_memory_has_room", lambda: room)
    workers = _run(folder, vit_backend, tmp_path / "workers", writers=2, workers=2)
    assert workers.ok == inline.ok == 3
    assert _outputs(tmp_path / "workers") == _outputs(tmp_path / "inline")
    items, _ = collect_inputs([str(folder)])
    loader = decode.image_loader(items, vit_backend.preprocess, 3, 2, 10**8)
    (batch,) = list(loader)
    assert {type(d.pixels) for d in batch} == {torch.Tensor if room else np.ndarray}
    assert all(d.display.dtype == np.uint8 and d.display.shape[2] == 3 for d in batch)


def test_writer_threads_give_the_files_and_manifest_of_writing_in_line(tmp_path, vit_backend):
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(5):
        random_image(i, (64 + 8 * i, 48)).save(folder / f"{i}.png")
    (folder / "broken.png").write_bytes(b"not a png")
    inline = _run(folder, vit_backend, tmp_path / "inline", writers=0)
    pooled = _run(folder, vit_backend, tmp_path / "pooled", writers=3)
    assert (inline.ok, inline.failed) == (pooled.ok, pooled.failed) == (5, 1)

    def records(out):
        lines = [json.loads(line) for line in (out / MANIFEST).read_text().splitlines()]
        return [{k: v for k, v in r.items() if k not in ("seconds",)} for r in lines]

    assert records(tmp_path / "inline") == records(tmp_path / "pooled")
    files = _outputs(tmp_path / "inline")
    # per image: 2 prompts × 2 methods × 2 PNGs, the comparison sheet and maps.npz
    assert len(files) == 5 * (2 * 2 * 2 + 2)
    assert _outputs(tmp_path / "pooled") == files


def test_an_interrupted_run_keeps_every_result_finished_before_it():
    got: list[int] = []
    started = threading.Barrier(4)

    def job(i: int) -> int:
        if i < 3:
            started.wait()  # three jobs in flight when the interrupt comes
            time.sleep(0.05)
        return i

    with pytest.raises(KeyboardInterrupt), OrderedWriters(3, got.append, max_pending=8) as pool:
        for i in range(3):
            pool.submit(job, i)
        started.wait()
        raise KeyboardInterrupt
    assert got == [0, 1, 2]  # finished while the run stopped: recorded, in order
