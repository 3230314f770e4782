"""`clipviz bench` reports each method against the forward pass of the same run."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from clipviz.cli import app
from clipviz.runs.bench import run_bench


def test_bench_rows_are_relative_to_the_forward_pass(vit_backend):
    # one round: the ratio is that round's method time over its forward time
    rows = run_bench(vit_backend, ["itsm"], batch_size=2, n_prompts=2, repeats=1)
    assert [r.name for r in rows] == ["forward (encode_image)", "itsm"]
    forward, itsm = rows
    assert forward.ratio == 1.0
    assert abs(itsm.ratio - itsm.ms_per_image / forward.ms_per_image) < 1e-9


def test_bench_cli_writes_json(tmp_path, tiny_weights):
    config, weights = tiny_weights["rn"]
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(
        app,
        ["bench", "-m", "itsm", "--repeats", "1", "-b", "2", "--json", str(out),
         "--model-config", str(config), "--pretrained", str(weights)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert [r["name"] for r in data["rows"]] == ["forward (encode_image)", "itsm"]
    assert data["batch_size"] == 2 and data["model"]["model"] == "tiny-rn"


def test_bench_lists_a_method_the_tower_cannot_run_instead_of_failing(family_backends):
    # gae runs on ViTs, but needs a class token: a MAP-head tower has none
    rows = run_bench(family_backends("map"), ["itsm", "gae"], batch_size=1, n_prompts=1,
                     repeats=1)  # fmt: skip
    itsm, gae = rows[1:]
    assert itsm.ratio > 0 and not itsm.note
    assert gae.ratio != gae.ratio and gae.note.endswith("n/a")  # NaN


def test_every_figure_carries_its_fastest_and_slowest_round(vit_backend):
    rows = run_bench(vit_backend, ["itsm", "surgery"], batch_size=2, n_prompts=2, repeats=3)
    for r in rows:
        assert r.ms_min <= r.ms_per_image <= r.ms_max
        assert r.ratio_min <= r.ratio <= r.ratio_max
        assert r.spread == (r.ms_max - r.ms_min) / r.ms_per_image
        assert r.noisy == (r.spread > 0.2)
    assert rows[0].ratio_min == rows[0].ratio_max == 1.0  # the forward against itself


def test_a_round_spread_over_a_fifth_is_flagged_noisy():
    from clipviz.runs.bench import bench_row

    steady = bench_row("m", [1.0, 1.05, 1.1], [0.1, 0.1, 0.1], images=10)
    busy = bench_row("m", [1.0, 1.05, 1.5], [0.1, 0.1, 0.1], images=10)
    assert steady.ms_per_image == pytest.approx(105.0) and not steady.noisy
    assert busy.noisy and busy.ratio_max == pytest.approx(1.5) and busy.ratio == pytest.approx(1.05)


def test_pipeline_bench_times_explain_over_a_folder_against_the_forward(tmp_path, tiny_weights):
    from conftest import random_image

    for i in range(6):
        random_image(i).save(tmp_path / f"{i}.jpg")
    config, weights = tiny_weights["vit"]
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(
        app,
        ["bench", "--pipeline", str(tmp_path), "--repeats", "2", "-b", "2", "--workers", "0",
         "--json", str(out), "--model-config", str(config), "--pretrained", str(weights)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    forward, run = data["rows"]
    assert forward["name"] == "forward (encode_image)" and run["name"].startswith(
        "explain 6 images"
    )
    # images per second relative to the forward: the forward's time over the run's
    assert run["ratio"] == pytest.approx(forward["ms_per_image"] / run["ms_per_image"], rel=0.5)
    assert run["ratio_min"] <= run["ratio"] <= run["ratio_max"]
    assert data["pipeline"]["images"] == 6 and set(data["pipeline"]["peak_rss_mb"]) == {"1", "6"}
    assert not list(tmp_path.glob("*/manifest.jsonl"))  # written to a temporary folder
    missing = CliRunner().invoke(app, ["bench", "--pipeline", str(tmp_path / "nope")])
    assert missing.exit_code == 2 and "not a folder" in missing.output


def test_pipeline_bench_hands_the_method_options_to_the_run(tmp_path, vit_backend, monkeypatch):
    from conftest import random_image

    import clipviz.runs.explain
    from clipviz.data.inputs import collect_inputs
    from clipviz.runs.bench import run_pipeline_bench

    for i in range(2):
        random_image(i).save(tmp_path / f"{i}.jpg")
    items, _ = collect_inputs([str(tmp_path)])
    real, seen = clipviz.runs.explain.run_explain, []

    def spy(*args, **kwargs):
        seen.append(kwargs.get("method_options"))
        return real(*args, **kwargs)

    monkeypatch.setattr(clipviz.runs.explain, "run_explain", spy)
    options = {"surgery": {"depth": 1}}
    run_pipeline_bench(vit_backend, items, ["surgery"], 2, 2, 1, workers=0, options=options)
    assert seen == [options]


def test_segment_bench_times_the_run_against_the_forward_over_the_same_windows(
    tmp_path, vit_backend
):
    from conftest import random_image

    from clipviz.data.inputs import collect_inputs
    from clipviz.runs.bench import run_segment_bench, window_forward
    from clipviz.segment import Protocol, Segmenter, inline_classes

    random_image(0, (96, 64)).save(tmp_path / "a.png")
    random_image(1, (64, 130)).save(tmp_path / "b.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    items, _ = collect_inputs([str(tmp_path)])
    protocol = Protocol(short_side=64, window=32, stride=16)
    segmenter = Segmenter(vit_backend, inline_classes("sky,grass"), "sclip", protocol)
    windows, _ = window_forward(segmenter, items)
    # a: 64 high, 96 wide in 3x5 windows of 32, stride 16; b: 130 high, 64 wide in 8x3
    expected = sum(
        len(segmenter.prepare(np.asarray(Image.open(tmp_path / n).convert("RGB"))).windows)
        for n in ("a.png", "b.png")
    )
    assert windows == expected == 3 * 5 + 8 * 3
    result = run_segment_bench(segmenter, items, batch_size=2, repeats=1, workers=0, writers=0)
    forward, run = result.rows
    assert run.name == f"segment 3 images, {windows} windows (sclip)"
    # windows per second relative to the forward's: the forward's time over the run's
    assert run.ratio == pytest.approx(forward.ms_per_image / run.ms_per_image)
    assert not list(tmp_path.glob("**/labels.png"))  # written to a temporary folder


def test_segment_bench_cli_reports_windows_and_refuses_two_folders(tmp_path, tiny_weights):
    from conftest import random_image

    random_image(0, (64, 64)).save(tmp_path / "a.png")
    config, weights = tiny_weights["vit"]
    out = tmp_path / "bench.json"
    model = ["--model-config", str(config), "--pretrained", str(weights)]
    result = CliRunner().invoke(
        app,
        ["bench", "--segment", str(tmp_path), "--repeats", "1", "--workers", "0", "--json",
         str(out), *model],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert [r["name"] for r in data["rows"]] == [
        "forward (image_embedding)",
        "segment 1 images, 4 windows (sclip)",
    ]  # fmt: skip  (resized to 336x336: 2x2 windows of 224, stride 112)
    assert data["segment"]["preset"] == "sclip/voc21" and data["segment"]["unit"] == "window"
    both = CliRunner().invoke(
        app, ["bench", "--segment", str(tmp_path), "--pipeline", str(tmp_path), *model]
    )
    assert both.exit_code == 2 and "not both" in both.output
