"""`clipviz report` on a segment run: classes with colours and shares, overlays, failures,
every name escaped and every file inside the run."""

from __future__ import annotations

import json
import re

from conftest import random_image
from typer.testing import CliRunner

from clipviz.cli import app


def _page_data(page):
    found = re.search(r"<script id='data' type='application/json'>(.*?)</script>", page, re.S)
    return json.loads(found.group(1))


def test_report_of_a_segment_run_shows_classes_overlays_and_failures(tmp_path, tiny_weights):
    config, weights = tiny_weights["vit"]
    photos = tmp_path / "photos"
    photos.mkdir()
    random_image(0, (64, 48)).save(photos / "a.png")
    (photos / "<b>bad.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "run"
    hostile = "cat</script><script>alert(1)</script>"
    result = CliRunner().invoke(
        app,
        ["segment", str(photos / "a.png"), str(photos / "<b>bad.jpg"), "--classes",
         f"sky,{hostile},grass", "--short-side", "64", "--window", "0", "--out", str(out),
         "--workers", "0", "-q", "--model-config", str(config), "--pretrained", str(weights)],
    )  # fmt: skip
    assert result.exit_code == 1, result.output
    ok = next(json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()
              if '"ok"' in line)  # fmt: skip
    # a record whose overlay lies outside the run is left out, not linked
    (tmp_path / "elsewhere.png").write_bytes((out / "a.png" / "overlay.png").read_bytes())
    outside = {**ok, "input": "/x/out.png", "output": "..", "files": {"overlay": "elsewhere.png"}}
    with open(out / "manifest.jsonl", "a") as f:
        f.write(json.dumps(outside) + "\n")
    result = CliRunner().invoke(app, ["report", str(out)])
    assert result.exit_code == 0, result.output
    page = (out / "report.html").read_text()
    assert "alert(1)</script>" not in page and "<b>bad" not in page
    assert "&lt;b&gt;bad.jpg" in page  # the failure, escaped
    assert "outside the run folder" in page and "elsewhere" in result.output
    data = _page_data(page)
    assert data["classes"] == [["sky"], [hostile], ["grass"]]
    assert data["colours"][:3] == [[0, 0, 0], [128, 0, 0], [0, 128, 0]]
    [image] = data["images"]
    assert image["key"] == "a.png" and image["overlay"] == "a.png/overlay.png"
    assert image["shares"] == ok["shares"] and abs(sum(image["shares"].values()) - 1) < 1e-4
    assert image["thumb"] == "report-thumbs/a.png/overlay.png.jpg"
    assert (out / image["thumb"]).is_file()
    assert data["totals"] == {c: {"images": 1, "share": s} for c, s in ok["shares"].items()}


def test_report_of_a_segment_run_over_shards_says_where_its_results_are(tmp_path):
    run = {"schema_version": 1, "kind": "segment_shards", "shards": [], "protocol": {}}
    (tmp_path / "run.json").write_text(json.dumps(run))
    (tmp_path / "manifest.jsonl").write_text("")
    result = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 2 and "shards/*.parquet" in result.output, result.output
    assert not (tmp_path / "report.html").exists()
