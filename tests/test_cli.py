"""`clipviz explain` as users type it: folders with bad files, resume, usage errors, offline."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import random_image
from PIL import Image
from typer.testing import CliRunner

from clipviz.cli import app
from clipviz.render import load_npz

runner = CliRunner()


def _model_args(tiny_weights, tower="vit"):
    config, weights = tiny_weights[tower]
    return ["--model-config", str(config), "--pretrained", str(weights)]


def _manifest(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


@pytest.fixture
def messy_folder(tmp_path):
    """Two good images, a truncated JPEG, a text file posing as JPEG, a 16-bit PNG, a README."""
    d = tmp_path / "photos"
    d.mkdir()
    random_image(1).save(d / "good1.jpg")
    random_image(2, size=(120, 64)).save(d / "good2.png")
    buf = io.BytesIO()
    random_image(3).save(buf, "JPEG")
    (d / "broken.jpg").write_bytes(buf.getvalue()[:200])
    (d / "notes.jpg").write_text("this is text")
    Image.fromarray(np.arange(64 * 48, dtype=np.uint16).reshape(48, 64) * 20).save(d / "deep.png")
    (d / "README.txt").write_text("not an image")
    return d


def test_folder_run_reports_bad_files_and_resumes(messy_folder, tmp_path, tiny_weights):
    out = tmp_path / "out"
    args = ["explain", str(messy_folder), "dog", "a red square", "--out", str(out), "-b", "2"]
    args += _model_args(tiny_weights)
    result = runner.invoke(app, args)
    assert result.exit_code == 1, result.output
    records = {Path(r["input"]).name: r for r in _manifest(out)}
    assert {k: r["status"] for k, r in records.items()} == {
        "good1.jpg": "ok",
        "good2.png": "ok",
        "deep.png": "ok",
        "broken.jpg": "failed",
        "notes.jpg": "failed",
    }
    assert "truncated" in records["broken.jpg"]["error"]
    assert "not an image" in records["notes.jpg"]["error"]
    assert "1 non-image files ignored" in result.output

    folder = out / "good2.png"
    assert sorted(p.name for p in folder.iterdir()) == [
        "a-red-square.heatmap.png",
        "a-red-square.overlay.png",
        "dog.heatmap.png",
        "dog.overlay.png",
        "maps.npz",
    ]
    assert Image.open(folder / "dog.overlay.png").size == (120, 64)
    npz = load_npz(folder / "maps.npz")
    assert list(npz["prompts"]) == ["dog", "a red square"]
    assert npz["maps"].shape == (2, 4, 4) and npz["upsampled"].shape == (2, 64, 120)
    assert (
        npz["upsampled"].max() >= 250 and npz["upsampled"].min() <= 5
    )  # normalised, then bilinear
    probs = records["good2.png"]["probs"]
    assert abs(sum(probs.values()) - 1) < 1e-5
    np.testing.assert_allclose(npz["probs"], list(probs.values()), rtol=1e-5)

    again = runner.invoke(app, args)
    assert again.exit_code == 1
    second = _manifest(out)[5:]
    assert sorted((Path(r["input"]).name, r["status"]) for r in second) == [
        ("broken.jpg", "failed"),
        ("deep.png", "skipped"),
        ("good1.jpg", "skipped"),
        ("good2.png", "skipped"),
        ("notes.jpg", "failed"),
    ]

    changed = runner.invoke(app, [*args[:2], "cat", *args[4:]])
    assert changed.exit_code == 1
    assert [r["status"] for r in _manifest(out)[10:] if r["status"] != "failed"] == ["ok"] * 3


def test_positional_prompt_as_typed_in_the_readme(tmp_path, tiny_weights):
    random_image(0).save(tmp_path / "img.jpg")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "clipviz",
            "explain",
            "img.jpg",
            "dog",
            "-q",
            *_model_args(tiny_weights),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "clipviz-out" / "img.jpg" / "dog.overlay.png").is_file()
    (record,) = _manifest(tmp_path / "clipviz-out")
    assert record["status"] == "ok" and record["top"] == "dog"


def test_prompts_from_options_files_and_stdin_inputs(tmp_path, tiny_weights):
    random_image(0).save(tmp_path / "a.jpg")
    (tmp_path / "prompts.txt").write_text("grass\n# comment\nsky\n")
    result = runner.invoke(
        app,
        [
            "explain",
            "--inputs-file",
            "-",
            "dog",
            "-p",
            "a cat",
            "--prompts-file",
            str(tmp_path / "prompts.txt"),
            "--out",
            str(tmp_path / "o"),
            "-q",
            *_model_args(tiny_weights, "rn"),
        ],
        input=f"{tmp_path / 'a.jpg'}\n",
    )
    assert result.exit_code == 0, result.output
    npz = load_npz(tmp_path / "o" / "a.jpg" / "maps.npz")
    assert list(npz["prompts"]) == ["dog", "a cat", "grass", "sky"]
    assert npz["maps"].shape == (4, 2, 2)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], "no prompts given"),
        (["dog", "--method", "nope"], "unknown method 'nope'"),
        (["dog", "--colormap", "no-such-map"], "unknown colormap"),
        (["dog", "--alpha", "2"], "outside [0, 1]"),
        (["dog", "--pretrained", "missing.safetensors"], "neither a weights file nor a tag"),
    ],
)
def test_usage_errors_exit_2_with_one_line(tmp_path, tiny_weights, extra, message):
    random_image(0).save(tmp_path / "img.jpg")
    config, _ = tiny_weights["vit"]
    args = ["explain", str(tmp_path / "img.jpg"), *extra, "--model-config", str(config)]
    if "--pretrained" not in extra:
        args += ["--pretrained", str(tiny_weights["vit"][1])]
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output


def test_offline_default_weights_fail_fast_with_one_line(tmp_path):
    random_image(0).save(tmp_path / "img.jpg")
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf"),
        "XDG_CACHE_HOME": str(tmp_path / "xdg"),
        "HOME": str(tmp_path),
    }
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "clipviz",
            "explain",
            "img.jpg",
            "dog",
            "--pretrained",
            "openai",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert "ViT-B-16/openai" in lines[0] and "--pretrained PATH" in lines[0]
    assert not (tmp_path / "clipviz-out" / "img.jpg").exists()


def test_json_prints_one_machine_readable_result_on_stdout(messy_folder, tmp_path, tiny_weights):
    out = tmp_path / "out"
    result = runner.invoke(app, ["explain", str(messy_folder), "dog", "--out", str(out), "--json",
                                 *_model_args(tiny_weights)])  # fmt: skip
    assert result.exit_code == 1  # the broken files, as without --json
    data = json.loads(result.stdout)  # stdout is the JSON alone: no table, no summary line
    assert data["schema_version"] and data["ok"] == 3 and data["failed"] == 2
    assert {Path(r["input"]).name for r in data["records"] if r["status"] == "ok"} == {
        "good1.jpg", "good2.png", "deep.png"}  # fmt: skip
    assert data["manifest"] == str(out / "manifest.jsonl")


def test_eval_json_dash_prints_the_results_on_stdout(tmp_path, tiny_weights, monkeypatch):
    from clipviz.testbed.world import write_voc

    write_voc(tmp_path / "voc", 4, seed=2, size=64)
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["eval", str(tmp_path / "voc"), "--json", "-", "--metric", "msc",
                                 *_model_args(tiny_weights)])  # fmt: skip
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["results"]["itsm"]["msc_ci"] and data["dataset"]["scored"] == 4
    saved = tmp_path / "clipviz-eval" / "voc_val.json"
    assert json.loads(saved.read_text()) == data  # the file is kept at its default place


@pytest.mark.parametrize("fmt", ["md", "csv", "json"])
def test_table_format_writes_the_tables_for_scripts(tmp_path, tiny_weights, monkeypatch, fmt):
    import csv as csv_module
    import io

    from clipviz.testbed.world import write_voc

    write_voc(tmp_path / "voc", 4, seed=2, size=64)
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["eval", str(tmp_path / "voc"), "-m", "itsm", "-m", "random",
                                 "--metric", "msc", "--table-format", fmt, "--fresh",
                                 *_model_args(tiny_weights)])  # fmt: skip
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "clipviz-eval" / "voc_val.json").read_text())["results"]
    out = result.stdout
    if fmt == "json":
        tables = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        rows = {r["method"]: r for r in tables[0]["rows"]}
        assert float(rows["itsm"]["mSC %"]) == pytest.approx(saved["itsm"]["msc"], abs=0.05)
        assert tables[1]["title"].startswith("95 % intervals")
    elif fmt == "csv":
        first = out.split("\n\n")[0]
        rows = list(csv_module.DictReader(io.StringIO(first)))
        assert [r["method"] for r in rows] == ["itsm", "random"]
    else:
        assert "| method | mSC % |" in out and "| --- | --- |" in out and "┃" not in out
    bad = runner.invoke(app, ["eval", str(tmp_path / "voc"), "--table-format", "xml",
                              *_model_args(tiny_weights)])  # fmt: skip
    assert bad.exit_code == 2 and "unknown --table-format 'xml'" in bad.output


def test_save_and_render_size_choose_what_is_written(tmp_path, tiny_weights):
    from PIL import Image

    from clipviz.runs.outputs import RenderOptions

    random_image(1, size=(96, 80)).save(tmp_path / "a.png")
    out = tmp_path / "out"
    base = ["explain", str(tmp_path / "a.png"), "dog", "grass", "-o", str(out), "-q",
            *_model_args(tiny_weights)]  # fmt: skip
    only_maps = runner.invoke(app, [*base, "--save", "maps"])
    assert only_maps.exit_code == 0, only_maps.output
    assert sorted(p.name for p in (out / "a.png").iterdir()) == ["maps.npz"]
    assert _manifest(out)[-1]["outputs"] == ["maps.npz"]
    small = runner.invoke(app, [*base, "--save", "overlays", "--save", "maps",
                                "--render-size", "48"])  # fmt: skip
    assert small.exit_code == 0, small.output
    names = sorted(p.name for p in (out / "a.png").iterdir())
    assert names == ["dog.overlay.png", "grass.overlay.png", "maps.npz"]  # no heatmaps
    assert Image.open(out / "a.png" / "dog.overlay.png").size == (48, 40)
    npz = load_npz(out / "a.png" / "maps.npz")
    assert npz["upsampled"].shape == (2, 40, 48) and list(npz["render_size"]) == [48, 40]
    again = runner.invoke(app, [*base, "--save", "overlays", "--save", "maps",
                                "--render-size", "48"])  # fmt: skip
    assert _manifest(out)[-1]["status"] == "skipped" and again.exit_code == 0
    # the defaults keep the request key of runs made before these options existed
    assert RenderOptions().key() == {"colormap": "jet", "alpha": 0.5}
    for args, message in ((["--save", "pngs"], "--save pngs: choose from all"),
                          (["--render-size", "8"], "outside 16…4096")):  # fmt: skip
        bad = runner.invoke(app, [*base, *args])
        assert bad.exit_code == 2 and message in bad.output, bad.output
