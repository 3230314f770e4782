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
    assert "comparison.png" in page and "a dog — p = " in page
    assert "bad.jpg" in page and "not an image" in page


def test_report_of_a_folder_without_manifest_is_a_usage_error(tmp_path):
    result = runner.invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 2 and "no manifest.jsonl" in result.output
    assert not Path(tmp_path / "report.html").exists()
