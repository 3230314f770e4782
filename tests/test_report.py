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
    return json.loads(blob.group(1))


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


# -- a run folder from someone else ------------------------------------------------------


def _png(path, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    random_image(seed, (32, 24)).save(path)


def _record(output, overlay="dog.overlay.png", prompt="dog"):
    heatmap = overlay.replace("overlay", "heatmap")
    return {"input": f"/photos/{output}", "output": output, "status": "ok",
            "outputs": [overlay, heatmap], "probs": {prompt: 1.0}, "top": prompt,
            "prompt_files": {prompt: {"overlay": overlay, "heatmap": heatmap}}}  # fmt: skip


def _write_manifest(run, records):
    import json

    run.mkdir(parents=True, exist_ok=True)
    (run / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def _tree(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_report_leaves_out_records_whose_files_are_outside_the_run(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    for name in ("dog.overlay.png", "dog.heatmap.png", "secret.png"):
        _png(elsewhere / name, seed=1)
    run = tmp_path / "run"
    for folder in ("a.png", "b.png", "b2.png", "c.png"):
        _png(run / folder / "dog.overlay.png")
        _png(run / folder / "dog.heatmap.png")
    (run / "c.png" / "dog.overlay.png").unlink()
    (run / "c.png" / "dog.overlay.png").symlink_to(elsewhere / "secret.png")
    (run / "d.png").symlink_to(elsewhere, target_is_directory=True)
    hostile = {
        "absolute": _record(str(elsewhere)),
        "dotdot": _record("../elsewhere"),
        "name": _record("b.png", overlay="../../elsewhere/secret.overlay.png"),
        "absolute name": _record("b2.png", overlay=str(elsewhere / "dog.overlay.png")),
        "file link": _record("c.png"),
        "folder link": _record("d.png"),
    }
    for label, rec in hostile.items():
        rec["input"] = f"/photos/{label}"
    _write_manifest(run, [_record("a.png"), *hostile.values()])
    before = _tree(elsewhere)

    result = runner.invoke(app, ["report", str(run)])
    assert result.exit_code == 0, result.output
    data = _page_data((run / "report.html").read_text())
    assert [c["image"] for c in data["cards"]] == ["a.png"] and list(data["images"]) == ["a.png"]
    assert _tree(elsewhere) == before  # no thumbnail written there
    out = " ".join(result.output.split())
    page = (run / "report.html").read_text()
    for label in hostile:
        assert f"/photos/{label}" in out and f"/photos/{label}" in page, label
    assert out.count("outside the run folder") == len(hostile)


def test_thumbnails_are_not_written_through_a_link_out_of_the_run(tmp_path):
    from urllib.parse import unquote

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    run = tmp_path / "run"
    _png(run / "a.png" / "dog.overlay.png")
    _png(run / "a.png" / "dog.heatmap.png")
    _write_manifest(run, [_record("a.png")])
    (run / "report-thumbs").symlink_to(elsewhere, target_is_directory=True)

    result = runner.invoke(app, ["report", str(run)])
    assert result.exit_code == 0, result.output
    assert _tree(elsewhere) == []
    (card,) = _page_data((run / "report.html").read_text())["cards"]
    assert card["thumb"] == card["overlay"]  # the grid shows the overlay itself
    assert (run / unquote(card["thumb"])).is_file()
    assert "report-thumbs" in result.output


def test_embedded_json_cannot_close_or_comment_out_its_script(tmp_path):
    prompt = "</script><!--<script> & >"
    folder = "<!--<script>x.png"
    run = tmp_path / "run"
    _png(run / folder / "p.overlay.png")
    _png(run / folder / "p.heatmap.png")
    _write_manifest(run, [_record(folder, overlay="p.overlay.png", prompt=prompt)])
    assert runner.invoke(app, ["report", str(run)]).exit_code == 0
    page = (run / "report.html").read_text()
    blob = re.search(r"<script id='data' type='application/json'>(.*?)</script>", page, re.S)
    assert not set("<>&") & set(blob.group(1))
    data = _page_data(page)
    assert data["prompts"] == [prompt] and list(data["images"]) == [folder]


def _eval_results(path, name, miou=41.5, pairs=3):
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"results": {"itsm": {"miou": miou, "pairs": pairs}},
                                "metrics": ["miou"], "dataset": {"name": name}}))  # fmt: skip


def test_report_of_an_eval_folder_writes_the_page_of_each_results_json(tmp_path):
    folder = tmp_path / "clipviz-eval"
    _eval_results(folder / "voc_val.json", "voc_val")
    (folder / "voc_val.records.jsonl").write_text("")
    (folder / "notes.json").write_text('{"results are": "elsewhere"}')
    result = runner.invoke(app, ["report", str(folder)])
    assert result.exit_code == 0, result.output
    assert "41.5" in (folder / "voc_val.html").read_text()
    assert str(folder / "voc_val.html") in result.output.replace("\n", "")
    assert not (folder / "notes.html").exists()

    _eval_results(folder / "coco_val.json", "coco_val", miou=12.25)
    result = runner.invoke(app, ["report", str(folder)])
    assert result.exit_code == 0, result.output
    assert "12.2" in (folder / "coco_val.html").read_text()
    result = runner.invoke(app, ["report", str(folder), "--out", str(tmp_path / "one.html")])
    assert result.exit_code == 2 and "coco_val.json" in result.output
    assert not (tmp_path / "one.html").exists()


def test_eval_report_shows_odd_values_as_text_without_failing(tmp_path):
    path = tmp_path / "res.json"
    _eval_results(path, "<b>set</b>", miou="<script>alert(1)</script>", pairs="<i>3</i>")
    result = runner.invoke(app, ["report", str(path)])
    assert result.exit_code == 0, result.output
    page = path.with_suffix(".html").read_text()
    assert "<script>" not in page and "<i>" not in page and "<b>" not in page
    assert "&lt;i&gt;3&lt;/i&gt;" in page and "&lt;b&gt;set&lt;/b&gt;" in page


def test_shard_report_reads_no_table_outside_the_run(tmp_path):
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    table = pa.table({"key": ["SECRET-KEY"], "status": ["failed"], "error": ["boom"],
                      "top": [None], "probs": [None]})  # fmt: skip
    pq.write_table(table, elsewhere / "00000.parquet")
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"shards": ["/data/00000.tar"], "prompts": ["dog"]}))
    rec = {"input": "/data/00000.tar", "output": "../elsewhere/00000", "status": "ok",
           "samples": 1, "outputs": ["00000.tar", "00000.parquet"]}  # fmt: skip
    (run / "manifest.jsonl").write_text(json.dumps(rec) + "\n")
    result = runner.invoke(app, ["report", str(run)])
    assert result.exit_code == 0, result.output
    page = (run / "report.html").read_text()
    assert "SECRET-KEY" not in page and "00000.parquet</a>" not in page
    assert "outside the run folder" in " ".join(result.output.split())
