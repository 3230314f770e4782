"""`clipviz report` links every overlay that exists and lists failures."""

from __future__ import annotations

import re
from pathlib import Path

from conftest import random_image
from typer.testing import CliRunner

from clipviz.cli import app

runner = CliRunner()


def test_report_links_existing_overlays_and_lists_failures(tmp_path, tiny_weights):
    config, weights = tiny_weights["vit"]
    photos = tmp_path / "photos"
    photos.mkdir()
    random_image(0).save(photos / "a.png")
    (photos / "bad.jpg").write_text("not an image")
    out = tmp_path / "run"
    args = ["explain", str(photos), "a dog", "grass", "-m", "itsm", "-m", "random", "-o", str(out)]
    runner.invoke(app, [*args, "--model-config", str(config), "--pretrained", str(weights)])

    result = runner.invoke(app, ["report", str(out)])
    assert result.exit_code == 0, result.output
    page = (out / "report.html").read_text()
    sources = re.findall(r"src='([^']+)'", page)
    assert len(sources) == 1 + 4  # the comparison sheet and 2 prompts x 2 methods
    assert all((out / s).is_file() for s in sources)
    assert "comparison.png" in page
    for prompt in ("a dog", "grass"):  # captions name the prompt and the method
        for method in ("itsm", "random"):
            assert f"{prompt} — {method} — p = " in page
    assert "bad.jpg" in page and "not an image" in page


def test_report_of_a_folder_without_manifest_is_a_usage_error(tmp_path):
    result = runner.invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 2 and "no manifest.jsonl" in result.output
    assert not Path(tmp_path / "report.html").exists()


def test_repeated_and_case_variant_prompts_keep_their_own_files(tmp_path, tiny_weights):
    config, weights = tiny_weights["vit"]
    random_image(0).save(tmp_path / "a.png")
    out = tmp_path / "run"
    args = ["explain", str(tmp_path / "a.png"), "dog", "dog", "Dog", "-o", str(out), "-q",
            "--model-config", str(config), "--pretrained", str(weights)]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "'dog' is given 2 times; using it once" in result.output
    from clipviz.render import load_npz
    from clipviz.runs.manifest import latest_records

    (rec,) = latest_records(out).values()
    npz = load_npz(out / "a.png" / "maps.npz")
    assert list(npz["prompts"]) == ["dog", "Dog"] == list(rec["probs"]) == list(rec["prompt_files"])
    assert rec["prompt_files"]["Dog"]["overlay"] == "dog-2.overlay.png"
    runner.invoke(app, ["report", str(out)])
    page = (out / "report.html").read_text()
    assert "src='a.png/dog-2.overlay.png'" in page and ">Dog — p = " in page
