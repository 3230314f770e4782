"""Inputs that hold no image are a usage error: the user pointed at the wrong place."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from clipviz.cli import app
from clipviz.testbed.world import write_voc

runner = CliRunner()


@pytest.mark.parametrize(
    "command",
    [
        ["explain", "{folder}", "dog"],
        ["segment", "{folder}", "--classes", "sky,grass"],
        ["sanity", "{folder}", "dog"],
        ["concepts", "{folder}", "--synset", "dog.n.01"],
    ],
)
def test_a_folder_without_images_exits_2_in_one_line(tmp_path, command):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "README.txt").write_text("not an image")
    args = [a.format(folder=folder) for a in command] + ["--out", str(tmp_path / "out")]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert result.output.startswith(f"error: no images found in {folder}"), result.output
    assert len(result.output.strip().splitlines()) == 1, result.output


@pytest.mark.parametrize("task", ["maps", "segment"])
def test_eval_on_a_split_without_images_exits_2_as_a_bad_layout_does(tmp_path, task):
    write_voc(tmp_path / "voc", 1, seed=0, size=32)
    (tmp_path / "voc" / "ImageSets" / "Segmentation" / "val.txt").write_text("")
    args = ["eval", str(tmp_path / "voc"), "--task", task, "--split", "val"]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "has no images; check --split and the layout" in result.output, result.output
    missing = runner.invoke(app, ["eval", str(tmp_path / "nowhere"), "--task", task])
    assert missing.exit_code == 2 and "does not exist" in missing.output, missing.output
