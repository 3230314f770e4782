"""`clipviz eval --task segment`: the eight benchmarks' layouts, IoUMetric over a split from
the per-image records, intervals, resume, and the COCO-Object conversion."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from clipviz.cli import app
from clipviz.data.datasets.coco_object import coco_object_labels
from clipviz.data.datasets.semseg import LAYOUTS, open_segmentation
from clipviz.files import read_jsonl
from clipviz.runs.segment_eval import (
    SegmentEvalOptions,
    evaluate_segmentation,
    reduce_segment_records,
    segment_distribution,
)
from clipviz.segment import ClassNames, IoUMetric, Protocol, intersect_and_union
from clipviz.testbed.world import write_voc

runner = CliRunner()
SIZE = (48, 64)  # (height, width) of the generated images


def _png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _labels(seed: int) -> np.ndarray:
    """Labels 0 … 3 in bands, some 255, one pixel of 200 (outside every class list here)."""
    out = np.zeros(SIZE, dtype=np.uint8)
    out[:, 16:32], out[:, 32:48], out[:, 48:] = 1, 2, 3
    out[: 4 + seed] = 255
    out[-1, -1] = 200
    return out


def _image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (*SIZE, 3), dtype=np.uint8)


# per layout: (image path, label path) of each stem, relative to the root; the split file
STEMS = ("b_002", "a_001")
FILES = {
    "voc": ("JPEGImages/{s}.jpg", "SegmentationClass/{s}.png",
            "ImageSets/Segmentation/val.txt"),
    "context": ("JPEGImages/{s}.jpg", "SegmentationClassContext/{s}.png",
                "ImageSets/SegmentationContext/val.txt"),
    "coco-stuff": ("images/val2017/{s}.jpg", "annotations/val2017/{s}_labelTrainIds.png", None),
    "coco-object": ("images/val2017/{s}.jpg", "annotations/val2017/{s}_instanceTrainIds.png",
                    None),
    "cityscapes": ("leftImg8bit/val/frankfurt/{s}_leftImg8bit.png",
                   "gtFine/val/frankfurt/{s}_gtFine_labelTrainIds.png", None),
    "ade": ("images/validation/{s}.jpg", "annotations/validation/{s}.png", None),
}  # fmt: skip


def write_layout(root: Path, fmt: str) -> list[tuple[Path, Path]]:
    """Two images with labels in `fmt`'s layout (plus files the layout must not read); returns
    the (image, label) pairs in the order the layout lists them."""
    image_rel, label_rel, split_file = FILES[fmt]
    pairs = []
    for k, stem in enumerate(STEMS):
        image, label = root / image_rel.format(s=stem), root / label_rel.format(s=stem)
        _png(image, _image(k)) if image.suffix == ".png" else Image.fromarray(_image(k)).save(
            _mkdir(image), quality=95
        )
        _png(label, _labels(k))
        pairs.append((image, label))
    if split_file:
        _mkdir(root / split_file).write_text(f"{STEMS[0]}\n{STEMS[1]}\n")
        return pairs
    # files beside the labels that are not this layout's labels
    _png(pairs[0][1].with_name("decoy_labelIds.png"), np.full(SIZE, 7, np.uint8))
    return sorted(pairs)


def _mkdir(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


@pytest.mark.parametrize("fmt", list(FILES))
def test_each_layout_lists_its_images_and_labels(tmp_path, fmt):
    pairs = write_layout(tmp_path, fmt)
    dataset = open_segmentation(tmp_path, fmt)
    assert list(dataset) == pairs
    assert dataset.benchmark == LAYOUTS[fmt].benchmark
    labels = dataset.label(0)
    raw = np.asarray(Image.open(pairs[0][1])).astype(np.int64)
    if fmt == "ade":  # reduce_zero_label always: 0 → 255, others − 1, 255 stays
        expected = np.where((raw == 0) | (raw == 255), 255, raw - 1)
        assert dataset.reduce_zero_label and labels[-1, -1] == 199 and labels[10, 0] == 255
    else:
        expected = raw
    np.testing.assert_array_equal(labels, expected)


@pytest.mark.parametrize(("fmt", "benchmark"), [("voc", "voc20"), ("context", "context59")])
def test_reduce_zero_label_gives_the_sets_without_background(tmp_path, fmt, benchmark):
    pairs = write_layout(tmp_path, fmt)
    dataset = open_segmentation(tmp_path, fmt, reduce_zero_label=True)
    assert dataset.benchmark == benchmark
    labels, raw = dataset.label(1), _labels(1)
    assert (labels[raw == 0] == 255).all() and (labels[raw == 255] == 255).all()
    assert (labels[raw == 3] == 2).all() and (labels[raw == 1] == 0).all()
    assert list(dataset) == pairs


def test_missing_split_or_folder_is_a_usage_error_naming_the_fix(tmp_path):
    from clipviz.errors import ClipvizError

    write_layout(tmp_path, "voc")
    with pytest.raises(ClipvizError, match="available: val") as e:
        open_segmentation(tmp_path, "voc", split="test")
    assert e.value.exit_code == 2
    with pytest.raises(ClipvizError, match="no leftImg8bit/val/ folder"):
        open_segmentation(tmp_path, "cityscapes")
    with pytest.raises(ClipvizError, match="no background label to reduce"):
        write_layout(tmp_path / "city", "cityscapes")
        open_segmentation(tmp_path / "city", "cityscapes", reduce_zero_label=True)


def _record(index: int, tables: dict[str, np.ndarray]) -> dict:
    return {"index": index, "status": "ok", "counts": {k: v.tolist() for k, v in tables.items()}}


def test_split_metric_sums_counts_over_images_as_iou_metric():
    # image 1: class 0 everywhere right, class 1 missed; image 2: class 1 right, one 255 pixel
    pred1, gt1 = np.array([[0, 0], [0, 0]]), np.array([[0, 0], [0, 1]])
    pred2, gt2 = np.array([[1, 1], [1, 0]]), np.array([[1, 1], [1, 255]])
    records = [_record(i, {"m": intersect_and_union(p, g, 3)})
               for i, (p, g) in enumerate([(pred1, gt1), (pred2, gt2)])]  # fmt: skip
    res = reduce_segment_records(records, ["m"], ["bg", "one", "two"])["m"]
    # class 0: I = 3, U = 3 + 1 (image 2 has no class-0 label left after 255) → 3/4;
    # class 1: I = 3, U = 4 → 3/4; class 2: never labelled or predicted → left out
    assert res["miou_per_class"] == {"bg": 75.0, "one": 75.0, "two": None}
    assert res["miou"] == 75.0 and res["images"] == 2
    assert res["aacc"] == round(6 / 7 * 100, 2)  # 6 right of 7 labelled pixels
    assert res["macc"] == round((3 / 3 + 3 / 4) / 2 * 100, 2)
    # per-image mIoU averaged would be (mean(3/4, 0) + 1) / 2 = 0.6875: not the split's number
    assert all(res[f"{k}_ci"] is not None for k in ("miou", "aacc", "macc"))


def test_each_bootstrap_resample_is_the_metric_of_the_images_it_drew():
    from clipviz.runs.eval_stats import resample_draws

    rng = np.random.default_rng(0)
    tables = np.stack([intersect_and_union(rng.integers(0, 4, (6, 6)), rng.integers(0, 4, (6, 6)),
                                           4) for _ in range(5)])  # fmt: skip
    dist = segment_distribution(tables, resamples=20, seed=3)
    draws = resample_draws(5, 20, 3)
    for r in (0, 7, 19):
        metric = IoUMetric(4)
        metric.totals = tables[draws[r]].sum(axis=0)
        assert np.isclose(dist["miou"][r], metric.miou * 100)
        assert np.isclose(dist["aacc"][r], metric.aacc * 100)
        assert np.isclose(dist["macc"][r], metric.macc * 100)


THREE = ClassNames((("background",), ("sky",), ("red square",)))
WHOLE = Protocol(short_side=0, window=0)


@pytest.mark.parametrize("fmt", list(FILES))
def test_each_layout_is_segmented_and_counted(tmp_path, fmt, vit_backend):
    write_layout(tmp_path / "data", fmt)
    dataset = open_segmentation(tmp_path / "data", fmt)
    opts = SegmentEvalOptions(methods=("clearclip",), protocol=WHOLE)
    results, records = evaluate_segmentation(
        vit_backend, dataset, THREE, opts, tmp_path / "r.jsonl"
    )
    assert [r["status"] for r in records] == ["ok", "ok"]
    # the label counts are the labels 0 … 2 of each image, 255 and 200 left out
    for i, r in enumerate(records):
        labels = dataset.label(i)
        expected = [int((labels == c).sum()) for c in range(3)]
        assert r["counts"]["clearclip"][3] == expected
    assert results["clearclip"]["images"] == 2


def test_interrupted_eval_resumes_without_segmenting_done_images(tmp_path, vit_backend):
    write_voc(tmp_path / "voc", 4, seed=1, size=64)
    dataset = open_segmentation(tmp_path / "voc", "voc")
    classes = ClassNames(tuple((n,) for n in dataset.class_names or []))
    opts = SegmentEvalOptions(methods=("sclip",), protocol=WHOLE, batch_size=2)
    path = tmp_path / "r.jsonl"
    first, _ = evaluate_segmentation(vit_backend, dataset, classes, opts, path)
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:3]) + lines[3][:20])  # killed while writing the 4th
    seen: list[int] = []
    again, records = evaluate_segmentation(
        vit_backend, dataset, classes, opts, path, on_image=lambda r: seen.append(r["index"])
    )
    assert seen == [3] and len(records) == 4
    assert again == first
    # another protocol is another request: every image is segmented again
    seen.clear()
    other = SegmentEvalOptions(methods=("sclip",), protocol=Protocol(short_side=0, window=0,
                                                                      logit_scale=50))  # fmt: skip
    evaluate_segmentation(vit_backend, dataset, classes, other, path,
                          on_image=lambda r: seen.append(r["index"]))  # fmt: skip
    assert seen == [0, 1, 2, 3]


def _model_args(tiny_weights):
    config, weights = tiny_weights["vit"]
    return ["--model-config", str(config), "--pretrained", str(weights), "--device", "cpu"]


def test_cli_scores_the_split_records_the_settings_and_reports(tmp_path, tiny_weights):
    root = tmp_path / "voc"
    write_voc(root, 3, seed=2, size=64)
    (root / "JPEGImages" / "synth_00001.png").unlink()
    out = tmp_path / "res.json"
    result = runner.invoke(app, [
        "eval", str(root), "--task", "segment", "-m", "sclip", "--pamr-compare",
        "--short-side", "0", "--window", "0", "--prob-thd", "0.2", "--json", str(out),
        "--report", *_model_args(tiny_weights),
    ])  # fmt: skip
    assert result.exit_code == 1, result.output  # one image missing, the others scored
    assert "no such file" in result.output and "mIoU %" in result.output
    data = json.loads(out.read_text())
    assert data["task"] == "segment" and data["dataset"]["scored"] == 2
    assert data["dataset"]["reduce_zero_label"] is False and data["dataset"]["ignore_index"] == 255
    assert data["protocol"]["prob_thd"] == 0.2 and data["protocol"]["window"] == 0
    assert data["rows"]["sclip+pamr"]["protocol"]["pamr_steps"] == 10
    assert data["rows"]["sclip"]["protocol"]["pamr_steps"] == 0
    assert data["classes"][0] == ["background"] and len(data["classes"]) == 25
    records = [r for r in read_jsonl(out.with_suffix(".records.jsonl")) if r["status"] == "ok"]
    for row in ("sclip", "sclip+pamr"):
        metric = IoUMetric(25)
        metric.totals = np.sum([r["counts"][row] for r in records], axis=0)
        assert data["results"][row]["miou"] == round(metric.miou * 100, 2)
        assert len(data["results"][row]["miou_ci"]) == 2
    page = out.with_suffix(".html").read_text()
    assert "aAcc %" in page and "sclip+pamr" in page


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--window", "0"], "add --task segment"),
        (["--format", "ade"], "add --task segment"),
        (["--task", "segment", "--format", "cub"], "not a segmentation layout"),
        (["--task", "segment", "--prob-thd", "2"], "between 0 and 1"),
        (["--task", "segment", "--preset", "nosuch/voc21"], "no preset"),
        (["--task", "segment", "--preset", "trident/voc21"], "pass --method to use"),
        (["--task", "segment", "--batch-size", "0"], "error: --batch-size 0 must be at least 1"),
        (["--task", "segment", "--metric", "msc"], "scores saliency maps"),
        (["--task", "segment", "--tune-split", "train"], "scores saliency maps"),
    ],
)
def test_segment_usage_errors_exit_2(tmp_path, tiny_weights, args, message):
    write_layout(tmp_path, "voc")
    result = runner.invoke(app, ["eval", str(tmp_path), *args, *_model_args(tiny_weights)])
    assert result.exit_code == 2, result.output
    assert message in result.output


def test_coco_object_labels_follow_the_stuff_to_object_rule():
    # raw COCO-Stuff values: person (id 1), an unused id (12), stop sign (id 13, the 12th
    # thing), toothbrush (id 90, the 80th), the first stuff class (id 92), the last (182),
    # unlabeled
    raw = np.array([[0, 11, 12, 89, 91, 181, 255]], dtype=np.uint8)
    np.testing.assert_array_equal(coco_object_labels(raw), [[1, 11, 12, 80, 0, 0, 0]])
    # the raw values COCO's 80 thing categories use (ids 1 … 90 less the ten unused), in order
    used = [v for v in range(90) if v not in {11, 25, 28, 29, 44, 65, 67, 68, 70, 82}]
    assert coco_object_labels(np.array([used], np.uint8)).tolist() == [list(range(1, 81))]
    assert coco_object_labels(np.arange(91, 256, dtype=np.uint8)).max() == 0


def test_coco_object_command_writes_beside_the_raw_labels_and_goes_on_past_a_bad_one(tmp_path):
    folder = tmp_path / "annotations" / "val2017"
    raw = np.array([[0, 12, 91], [255, 89, 2]], dtype=np.uint8)
    _png(folder / "000000000139.png", raw)
    (folder / "000000000285.png").write_bytes(b"not a png")
    _png(folder / "000000000139_labelTrainIds.png", raw)  # converted already: not an input
    result = runner.invoke(app, ["coco-object", str(tmp_path), "--split", "val2017"])
    assert result.exit_code == 1, result.output
    assert "000000000285.png" in result.output and '"written": 1' in result.output
    written = np.asarray(Image.open(folder / "000000000139_instanceTrainIds.png"))
    np.testing.assert_array_equal(written, [[1, 12, 0], [0, 80, 3]])
    assert not (folder / "000000000139_labelTrainIds_instanceTrainIds.png").exists()
    (folder / "000000000285.png").unlink()
    again = runner.invoke(app, ["coco-object", str(tmp_path), "--split", "val2017"])
    assert again.exit_code == 0 and '"skipped": 1' in again.output


def test_default_results_do_not_replace_the_maps_eval_of_the_same_set(
    tmp_path, tiny_weights, monkeypatch
):
    write_voc(tmp_path / "voc", 1, seed=4, size=64)
    monkeypatch.chdir(tmp_path)
    maps = tmp_path / "clipviz-eval" / "voc_val.json"
    maps.parent.mkdir()
    maps.write_text('{"schema_version": 1, "results": {"itsm": {}}}')
    result = runner.invoke(app, ["eval", "voc", "--task", "segment", "--short-side", "0",
                                 "--window", "0", *_model_args(tiny_weights)])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads(maps.read_text())["results"] == {"itsm": {}}
    segment = json.loads((maps.parent / "voc_val.segment.json").read_text())
    assert segment["task"] == "segment" and segment["dataset"]["scored"] == 1


def test_a_benchmark_preset_gives_each_method_its_own_settings(tmp_path, tiny_weights):
    write_voc(tmp_path / "voc", 1, seed=5, size=64)
    out = tmp_path / "r.json"
    result = runner.invoke(app, ["eval", str(tmp_path / "voc"), "--task", "segment",
                                 "--preset", "voc21", "-m", "sclip", "-m", "naclip",
                                 "--short-side", "0", "--json", str(out),
                                 *_model_args(tiny_weights)])  # fmt: skip
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())["rows"]
    sclip, naclip = rows["sclip"]["protocol"], rows["naclip"]["protocol"]
    assert (sclip["logit_scale"], sclip["area_thd"], sclip["window"]) == (65, 0.1, 224)
    assert (naclip["logit_scale"], naclip["window"], naclip["pamr_steps"]) == (40, 0, 10)
    assert sclip["short_side"] == naclip["short_side"] == 0  # explicit options apply to both
