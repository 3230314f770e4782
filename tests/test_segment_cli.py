"""`clipviz segment` on the tiny ViT: outputs per image, the run's settings, bad inputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import typer
from conftest import random_image
from PIL import Image
from typer.testing import CliRunner

from clipviz.cli.output import handle_errors
from clipviz.cli.segment import segment
from clipviz.segment.outputs import overlay_with_legend, palette

runner = CliRunner()


@pytest.fixture
def app():
    app = typer.Typer()
    app.command("segment")(handle_errors(segment))
    app.command("other")(lambda: None)  # two commands: `segment` is named on the line
    return app


def model_args(tiny_weights):
    config, weights = tiny_weights["vit"]
    return ["--model-config", str(config), "--pretrained", str(weights), "--device", "cpu"]


def test_segment_writes_labels_overlay_and_manifest(app, tiny_weights, tmp_path):
    images = tmp_path / "photos"
    images.mkdir()
    random_image(0, (130, 97)).save(images / "a.png")
    (images / "broken.jpg").write_bytes(b"not a jpeg")
    classes = tmp_path / "classes.txt"
    classes.write_text("background, sky\nred square\ncat; kitten\n")
    out = tmp_path / "out"
    args = ["segment", str(images / "a.png"), str(images / "broken.jpg"), "--classes-file",
            str(classes), "--short-side", "96", "--window", "64", "--stride", "32",
            "--pamr", "--pamr-dilations", "1,2", "--save-probs", "--out", str(out), "-q",
            *model_args(tiny_weights)]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 1, result.output  # the broken file failed, the other is done
    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    by_status = {r["status"]: r for r in records}
    assert set(by_status) == {"ok", "failed"} and "broken.jpg" in by_status["failed"]["input"]
    ok = by_status["ok"]
    assert ok["files"] == {"labels": "labels.png", "overlay": "overlay.png", "probs": "probs.npz"}
    folder = out / ok["output"]
    assert folder == out / "a.png"
    labels = Image.open(folder / "labels.png")
    assert labels.mode == "P" and labels.size == (130, 97)
    assert set(np.unique(np.asarray(labels)).tolist()) == set(ok["classes"]) <= {0, 1, 2}
    counts = np.bincount(np.asarray(labels).ravel())
    assert ok["shares"] == {str(c): round(n / counts.sum(), 6) for c, n in enumerate(counts) if n}
    probs = np.load(folder / "probs.npz")
    assert probs["probs"].shape == (3, 97, 130) and probs["probs"].dtype == np.float16
    stored, chosen = probs["probs"].astype(np.float32), np.asarray(labels)
    # each pixel's label holds the best probability, to float16's rounding
    best = np.take_along_axis(stored, chosen[None].astype(np.int64), axis=0)[0]
    assert (best >= stored.max(0) - 1e-3).all()
    run = json.loads((out / "run.json").read_text())
    assert run["protocol"]["pamr_steps"] == 10 and run["protocol"]["pamr_dilations"] == [1, 2]
    assert run["method"] == "sclip" and run["classes"][2] == ["cat", "kitten"]


def test_a_preset_brings_its_settings_and_classes_and_options_override(app, tiny_weights, tmp_path):
    random_image(0, (64, 64)).save(tmp_path / "a.png")
    out = tmp_path / "out"
    args = ["segment", str(tmp_path / "a.png"), "--preset", "sclip/voc21", "--short-side", "64",
            "--window", "64", "--stride", "32", "--out", str(out), "-q",
            *model_args(tiny_weights)]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    run = json.loads((out / "run.json").read_text())
    assert run["protocol"]["logit_scale"] == 65.0 and run["protocol"]["area_thd"] == 0.1
    assert run["protocol"]["short_side"] == 64 and run["protocol"]["stride"] == 32
    assert len(run["classes"]) == 21 and run["preset"] == "sclip/voc21"


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        (["--classes", "a,b", "--window", "64", "--stride", "0"], "stride"),
        (["--classes", "a,,b"], "empty name"),
        (["--preset", "gem/voc21"], "no preset gem/voc21"),
        (["--preset", "trident/voc21"], "pass --method to use"),
        ([], "no classes"),
        (["--classes", "a,b", "--classes-file", "c.txt"], "give --classes-file or --classes,"),
        (["--classes", "a,b", "--alpha", "2"], "error: --alpha 2.0 must be between 0 and 1"),
        (["--classes", "a,b", "--batch-size", "0"], "error: --batch-size 0 must be at least 1"),
        (["--classes", "a,b", "--pamr-dilations", "x"], "error: --pamr-dilations 'x' is not"),
    ],
)
def test_bad_options_are_one_line_and_exit_2(app, tiny_weights, tmp_path, extra, says):
    random_image(0, (64, 64)).save(tmp_path / "a.png")
    args = ["segment", str(tmp_path / "a.png"), "--out", str(tmp_path / "out"), *extra,
            *model_args(tiny_weights)]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and says in result.output, result.output


def test_palette_is_vocs_and_the_legend_names_present_classes():
    assert palette(3).tolist() == [[0, 0, 0], [128, 0, 0], [0, 128, 0]]
    assert palette(16)[15].tolist() == [192, 128, 128]  # VOC's person
    image = np.full((40, 30, 3), 200, dtype=np.uint8)
    labels = np.zeros((40, 30), dtype=np.int64)
    labels[:, 20:] = 2
    shown = overlay_with_legend(image, labels, ["bg", "cat", "dog"], alpha=0.5)
    assert shown.shape[0] == 40 and shown.shape[1] > 30
    assert shown[0, 0].tolist() == [100, 100, 100]  # class 0 black, half blended
    assert shown[0, 25].tolist() == [100, 164, 100]  # class 2 (0, 128, 0), half blended


def _records(out):
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def test_a_rerun_skips_finished_images_and_overwrite_redoes_them(app, tiny_weights, tmp_path):
    for i, name in enumerate(["a.png", "b.png"]):
        random_image(i, (64, 48)).save(tmp_path / name)
    listed = tmp_path / "list.txt"
    listed.write_text(f"{tmp_path / 'a.png'}\n{tmp_path / 'b.png'}\n")
    out = tmp_path / "out"
    args = ["segment", "--inputs-file", str(listed), "--classes", "sky,grass", "--short-side",
            "64", "--window", "0", "--out", str(out), "-q", "--workers", "0",
            *model_args(tiny_weights)]  # fmt: skip
    assert runner.invoke(app, args).exit_code == 0
    first = _records(out)
    assert [r["status"] for r in first] == ["ok", "ok"]
    (out / "b.png" / "labels.png").unlink()  # lost: b is done again, a is skipped
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert (payload["ok"], payload["skipped"], payload["failed"]) == (1, 1, 0)
    assert [r["status"] for r in _records(out)[2:]] == ["skipped", "ok"]
    assert (out / "b.png" / "labels.png").is_file()
    assert runner.invoke(app, [*args, "--overwrite"]).exit_code == 0
    assert [r["status"] for r in _records(out)[4:]] == ["ok", "ok"]
    # other classes are another request: nothing is skipped
    other = [a if a != "sky,grass" else "sky,water" for a in args]
    assert runner.invoke(app, other).exit_code == 0
    assert [r["status"] for r in _records(out)[6:]] == ["ok", "ok"]
    assert json.loads((out / "run.json").read_text())["kind"] == "segment"


@pytest.mark.parametrize(
    ("existing", "says"),
    [
        ({"notes.txt": "mine"}, "is not a clipviz run"),
        ({"run.json": json.dumps({"schema_version": 1, "kind": "explain"})}, "explain run"),
    ],
)
def test_an_out_folder_of_other_files_or_another_run_is_refused(
    app, tiny_weights, tmp_path, existing, says
):
    random_image(0, (64, 64)).save(tmp_path / "a.png")
    out = tmp_path / "out"
    out.mkdir()
    for name, text in existing.items():
        (out / name).write_text(text)
    args = ["segment", str(tmp_path / "a.png"), "--classes", "a,b", "--out", str(out),
            *model_args(tiny_weights)]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and says in result.output, result.output
    assert sorted(p.name for p in out.iterdir()) == sorted(existing)
    result = runner.invoke(app, [*args, "--overwrite", "-q"])
    assert result.exit_code == 0, result.output
    assert (out / "a.png" / "labels.png").is_file()


def test_a_run_json_without_kind_holding_a_protocol_and_classes_is_a_segment_run(tmp_path):
    from clipviz.runs.run_json import run_kind

    run = {"schema_version": 1, "protocol": {"window": 224}, "classes": [["sky"], ["sea"]]}
    (tmp_path / "run.json").write_text(json.dumps(run))
    assert run_kind(tmp_path) == "segment"


def test_two_torchrun_processes_segment_each_image_once_as_one_process_does(tiny_weights, tmp_path):
    from conftest import torchrun_two

    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(3):
        random_image(i, (48, 40)).save(photos / f"{i}.png")
    config, weights = tiny_weights["vit"]
    args = ["segment", str(photos), "--classes", "sky,grass", "--short-side", "40", "--window",
            "0", "--workers", "0", "-q", "--model-config", str(config), "--pretrained",
            str(weights), "--device", "cpu"]  # fmt: skip
    proc = torchrun_two([*args, "--out", str(tmp_path / "two")])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert runner.invoke(_cli(), [*args, "--out", str(tmp_path / "one")]).exit_code == 0
    two, one = _records(tmp_path / "two"), _records(tmp_path / "one")
    assert sorted(r["output"] for r in two) == ["0.png", "1.png", "2.png"]
    assert not list((tmp_path / "two").glob("manifest.rank*"))  # merged into the manifest
    for name in ("0.png", "1.png", "2.png"):
        a = np.asarray(Image.open(tmp_path / "two" / name / "labels.png"))
        b = np.asarray(Image.open(tmp_path / "one" / name / "labels.png"))
        assert np.array_equal(a, b)
    assert {r["output"]: r["shares"] for r in two} == {r["output"]: r["shares"] for r in one}


def _cli():
    from clipviz.cli import app as cli

    return cli


def test_list_presets_shows_every_preset_with_its_settings(app):
    from clipviz.segment import get_preset, preset_names

    result = CliRunner().invoke(app, ["segment", "--list-presets", "--json"])
    assert result.exit_code == 0, result.output
    rows = {r["name"]: r for r in json.loads(result.output)["presets"]}
    assert list(rows) == preset_names()
    naclip = get_preset("naclip/voc21")
    assert rows["naclip/voc21"]["protocol"]["window"] == naclip.protocol.window == 0
    assert rows["sclip/voc21"]["protocol"]["logit_scale"] == 65.0
    assert rows["naclip/voc21"]["sources"] == list(naclip.sources)
    table = CliRunner().invoke(app, ["segment", "--list-presets"], env={"COLUMNS": "250"})
    assert table.exit_code == 0 and "naclip/voc21" in table.output and "whole image" in table.output
