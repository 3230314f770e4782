"""`clipviz report` links every overlay that exists and lists failures."""

from __future__ import annotations

import re
from pathlib import Path

from conftest import random_image
from typer.testing import CliRunner

from clipviz.cli import app

runner = CliRunner()


def _page_data(page: str) -> dict:
    import json

    blob = re.search(r"<script id='data' type='application/json'>(.*?)</script>", page, re.S)
    return json.loads(blob.group(1).replace("<\\/", "</"))


def test_report_links_existing_overlays_and_lists_failures(tmp_path, tiny_weights):
    from urllib.parse import unquote

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
    data = _page_data(page)
    assert len(data["cards"]) == 4  # 2 prompts x 2 methods, one overlay each
    assert data["prompts"] == ["a dog", "grass"] and data["methods"] == ["itsm", "random"]
    from PIL import Image

    for card in data["cards"]:  # captions name the prompt and the method
        assert f"{card['prompt']} — {card['method']} — p = " in card["caption"]
        assert (out / unquote(card["overlay"])).is_file()
        with Image.open(out / unquote(card["thumb"])) as small:  # the grid's small copy
            assert small.format == "JPEG" and max(small.size) <= 440
    thumb = out / unquote(data["cards"][0]["thumb"])
    made = thumb.stat().st_mtime_ns
    assert runner.invoke(app, ["report", str(out)]).exit_code == 0
    assert thumb.stat().st_mtime_ns == made  # current thumbnails are not made again
    view = data["images"]["a.png"]
    assert (out / unquote(view["sheet"])).is_file() and view["sheet"].endswith("comparison.png")
    assert (out / unquote(view["original"])).resolve() == (photos / "a.png").resolve()
    files = [f["src"] for p in view["prompts"] for f in p["files"]]
    assert len(files) == 8 and all((out / unquote(f)).is_file() for f in files)  # + heatmaps
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
    cards = _page_data((out / "report.html").read_text())["cards"]
    dog2 = [c for c in cards if c["prompt"] == "Dog"]
    assert [c["overlay"] for c in dog2] == ["a.png/dog-2.overlay.png"]
    assert dog2[0]["caption"].startswith("a.png: Dog — p = ")
