"""`clipviz eval`: outputs, chance-level baseline, resume, bad inputs."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
from typer.testing import CliRunner

from clipviz.cli import app
from clipviz.data.datasets import open_dataset
from clipviz.runs.eval_results import reduce_records
from clipviz.runs.evaluate import EvalOptions, evaluate
from clipviz.testbed.world import write_voc

runner = CliRunner()


@pytest.fixture(scope="module")
def synth_voc(tmp_path_factory):
    root = tmp_path_factory.mktemp("voc")
    write_voc(root, 40, seed=7, size=64)
    return root


def _model_args(tiny_weights, tower="vit"):
    config, weights = tiny_weights[tower]
    return ["--model-config", str(config), "--pretrained", str(weights)]


def test_eval_prints_a_table_and_writes_json_and_per_image_csv(synth_voc, tmp_path, tiny_weights):
    out = tmp_path / "res.json"
    result = runner.invoke(
        app,
        ["eval", str(synth_voc), "--format", "voc", "-m", "itsm", "-m", "random", "--limit", "6",
         "--pointing-tolerance", "0", "--json", str(out), *_model_args(tiny_weights)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "mIoU %" in result.output and "random" in result.output
    data = json.loads(out.read_text())
    assert data["dataset"]["size"] == 6 and data["dataset"]["scored"] == 6
    assert data["model"]["model"] == "tiny-vit"
    assert set(data["results"]) == {"itsm", "random"}
    itsm = data["results"]["itsm"]
    assert 0.05 <= itsm["miou_threshold"] <= 0.95 and 0 <= itsm["miou"] <= 100
    assert -100 <= itsm["msc"] <= 100 and 0 <= itsm["pointing"] <= 1

    ds = open_dataset(synth_voc, "voc", limit=6)
    pairs = sum(len(ds[i].classes) for i in range(6))
    with open(out.with_suffix(".per_image.csv")) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * pairs
    itsm_msc = [float(r["msc"]) for r in rows if r["method"] == "itsm"]
    assert math.isclose(np.mean(itsm_msc), itsm["msc"], rel_tol=1e-4)


def test_uniform_random_maps_score_chance(synth_voc, vit_backend, tmp_path):
    ds = open_dataset(synth_voc, "voc")
    texts = vit_backend.encode_texts([c for c in ds.classes])
    opts = EvalOptions(methods=("random",), metrics=("msc", "pointing", "energy"),
                       pointing_tolerance=0)  # fmt: skip
    results, _ = evaluate(vit_backend, ds, texts, opts, tmp_path / "r.jsonl")
    res = results["random"]
    assert abs(res["msc"]) < 3.0  # a map that prefers nothing
    assert abs(res["pointing"] - res["area"]) < 0.08  # a random point hits as often as area
    assert abs(res["energy"] - res["area"]) < 0.03


def test_interrupted_eval_resumes_without_recomputing(
    synth_voc, vit_backend, tmp_path, monkeypatch
):
    import clipviz.runs.evaluate as ev

    texts = vit_backend.encode_texts(open_dataset(synth_voc, "voc").classes)
    opts = EvalOptions(methods=("itsm",), metrics=("miou", "msc", "maxboxacc"), batch_size=4)
    records = tmp_path / "r.jsonl"
    evaluate(vit_backend, open_dataset(synth_voc, "voc", limit=8), texts, opts, records)

    calls = []
    real = ev.explain
    monkeypatch.setattr(
        ev, "explain", lambda b, x, *a, **k: calls.append(len(x)) or real(b, x, *a, **k)
    )
    resumed, recs = evaluate(
        vit_backend, open_dataset(synth_voc, "voc", limit=12), texts, opts, records
    )
    assert sum(calls) == 4  # only the 4 new images ran

    fresh, _ = evaluate(vit_backend, open_dataset(synth_voc, "voc", limit=12), texts, opts,
                        tmp_path / "fresh.jsonl")  # fmt: skip
    assert resumed["itsm"]["miou"] == pytest.approx(fresh["itsm"]["miou"])
    assert resumed["itsm"]["msc"] == pytest.approx(fresh["itsm"]["msc"])
    assert reduce_records(recs, opts)["itsm"]["maxboxacc"] == pytest.approx(
        fresh["itsm"]["maxboxacc"]
    )


def test_a_missing_image_is_reported_and_the_rest_scored(tmp_path, tiny_weights):
    write_voc(tmp_path / "voc", 5, seed=3, size=64)
    (tmp_path / "voc" / "JPEGImages" / "synth_00002.png").unlink()
    out = tmp_path / "r.json"
    result = runner.invoke(
        app, ["eval", str(tmp_path / "voc"), "--json", str(out), *_model_args(tiny_weights, "rn")]
    )
    assert result.exit_code == 1
    data = json.loads(out.read_text())
    assert data["dataset"]["scored"] == 4
    assert (
        "synth_00002"
        in data["dataset"]["failed"][0]["image"] + data["dataset"]["failed"][0]["error"]
    )


def test_classes_file_rewords_prompts(synth_voc, tmp_path, tiny_weights):
    cf = tmp_path / "classes.txt"
    cf.write_text("red circle: a photo of a red disc\n")
    out = tmp_path / "r.json"
    result = runner.invoke(
        app,
        ["eval", str(synth_voc), "--limit", "2", "--classes-file", str(cf), "--json", str(out),
         "--metric", "msc", *_model_args(tiny_weights)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    prompts = json.loads(out.read_text())["prompts"]
    assert prompts["red circle"] == "a photo of a red disc" and prompts["blue star"] == "blue star"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--metric", "accuracy"], "unknown metric 'accuracy'"),
        (["--method", "nope"], "unknown method 'nope'"),
        (["--format", "generic"], "no images/ folder"),
    ],
)
def test_eval_usage_errors_exit_2(synth_voc, tiny_weights, args, message):
    result = runner.invoke(app, ["eval", str(synth_voc), *args, *_model_args(tiny_weights)])
    assert result.exit_code == 2
    assert message in result.output


def test_mask_metrics_on_box_only_data_are_refused(tmp_path, tiny_weights):
    root = tmp_path / "cub"
    (root / "images" / "001.Bird").mkdir(parents=True)
    from PIL import Image

    Image.new("RGB", (32, 32)).save(root / "images" / "001.Bird" / "a.jpg")
    (root / "images.txt").write_text("1 001.Bird/a.jpg\n")
    (root / "bounding_boxes.txt").write_text("1 2 2 10 10\n")
    (root / "image_class_labels.txt").write_text("1 1\n")
    (root / "classes.txt").write_text("1 001.Bird\n")
    result = runner.invoke(app, ["eval", str(root), "--format", "cub", "--metric", "miou",
                                 *_model_args(tiny_weights)])  # fmt: skip
    assert result.exit_code == 2 and "needs masks" in result.output


@pytest.fixture(scope="module")
def scored(synth_voc, vit_backend, tmp_path_factory):
    """Records of two methods over 16 images with every metric, deletion/insertion included."""
    ds = open_dataset(synth_voc, "voc", limit=16)
    texts = vit_backend.encode_texts(ds.classes, ensemble=False)
    metrics = ("miou", "msc", "pointing", "energy", "maxboxacc", "deletion", "insertion")
    opts = EvalOptions(methods=("itsm", "random"), metrics=metrics, batch_size=8,
                       pointing_tolerance=0)  # fmt: skip
    results, records = evaluate(
        vit_backend, ds, texts, opts, tmp_path_factory.mktemp("ci") / "r.jsonl"
    )
    return results, records, opts


def test_each_bootstrap_resample_equals_the_reduction_of_the_images_it_drew(scored):
    """The vectorised bootstrap against the plain procedure: draw the images, reduce them."""
    from clipviz.runs.eval_stats import bootstrap_distribution, resample_draws, scored_images

    _, records, opts = scored
    dist = bootstrap_distribution(records, opts.methods, opts.metrics, resamples=12, seed=3)
    images = scored_images(records)
    for r, draw in enumerate(resample_draws(len(images), 12, seed=3)):
        resampled = [images[i] for i in draw]
        plain = reduce_records(resampled, opts)
        for method in opts.methods:
            for name in opts.metrics:
                assert dist[method][name][r] == pytest.approx(plain[method][name], abs=1e-9), (
                    method, name, r)  # fmt: skip


def test_results_carry_intervals_around_the_estimate_and_the_curves(scored):
    results, records, opts = scored
    for method in opts.methods:
        r = results[method]
        for name in opts.metrics:
            lo, hi = r[f"{name}_ci"]
            assert lo <= r[name] + 1e-9 and r[name] - 1e-9 <= hi and lo < hi, (method, name)
        assert len(r["miou_curve"]) == 19 and max(r["miou_curve"]) == pytest.approx(
            r["miou"], abs=1e-3
        )
        assert len(r["maxboxacc_curve"]) == 100
        assert max(r["maxboxacc_curve"]) == pytest.approx(r["maxboxacc"], abs=1e-3)
        for mode in ("deletion", "insertion"):
            curve = r[f"{mode}_curve"]
            intact = curve[0] if mode == "deletion" else curve[-1]
            assert intact == pytest.approx(1.0, abs=1e-4)  # relative to the intact image
            assert np.trapezoid(curve, dx=1 / (len(curve) - 1)) == pytest.approx(r[mode], abs=1e-3)
    one = [records[0]]
    single = reduce_records(one, opts)["itsm"]
    assert single["msc_ci"] == pytest.approx([single["msc"], single["msc"]])  # one image


def test_tune_split_fixes_the_thresholds_chosen_on_another_split(tmp_path, tiny_weights):
    root = tmp_path / "voc"
    write_voc(root, 24, seed=11, size=64)
    ids = (root / "ImageSets" / "Segmentation" / "val.txt").read_text().split()
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(ids[:12]) + "\n")
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("\n".join(ids[12:]) + "\n")
    out = tmp_path / "res.json"
    args = ["eval", str(root), "-m", "itsm", "--metric", "miou", "--metric", "maxboxacc",
            "--json", str(out), *_model_args(tiny_weights)]  # fmt: skip
    tuned = runner.invoke(app, [*args, "--tune-split", "train"])
    assert tuned.exit_code == 0, tuned.output
    assert "thresholds τ chosen on" in tuned.output and "train (12 images)" in tuned.output
    data = json.loads(out.read_text())
    chosen = data["thresholds_chosen_on"]
    assert chosen["images"] == 12 and chosen["split"].endswith("train")
    itsm = data["results"]["itsm"]
    tau = chosen["thresholds"]["itsm"]["miou"]
    assert itsm["miou_threshold"] == tau
    # the score is the scored split's own curve read at the tuning split's τ
    curve, grid = itsm["miou_curve"], data["curves"]["miou_thresholds"]
    assert itsm["miou"] == pytest.approx(curve[grid.index(tau)], abs=1e-3)
    assert itsm["miou"] <= max(curve) + 1e-3
    box_tau = chosen["thresholds"]["itsm"]["maxboxacc"]
    assert itsm["maxboxacc"] == pytest.approx(
        itsm["maxboxacc_curve"][data["curves"]["maxboxacc_thresholds"].index(box_tau)], abs=1e-3
    )
    same = runner.invoke(app, [*args, "--tune-split", "val"])
    assert same.exit_code == 2 and "is the split being scored" in same.output
    plain = runner.invoke(app, [*args, "--fresh"])
    assert "chosen on the scored images themselves" in plain.output
    assert json.loads(out.read_text())["thresholds_chosen_on"] == "the scored images"


def test_two_torchrun_processes_score_what_one_does(tmp_path, tiny_weights):
    from conftest import torchrun_two

    root = tmp_path / "voc"
    write_voc(root, 14, seed=5, size=64)
    ids = (root / "ImageSets" / "Segmentation" / "val.txt").read_text().split()
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(ids[:9]) + "\n")
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("\n".join(ids[9:]) + "\n")
    (root / "JPEGImages" / f"{ids[3]}.jpg").write_bytes(b"not a jpeg")  # fails on one rank
    args = ["eval", str(root), "-m", "itsm", "-m", "surgery", "--tune-split", "train",
            "--metric", "miou", "--metric", "msc", "--metric", "maxboxacc", "-q", "-b", "2",
            *_model_args(tiny_weights), "--device", "cpu"]  # fmt: skip
    proc = torchrun_two([*args, "--json", str(tmp_path / "two.json")])
    assert proc.returncode == 1, proc.stderr[-3000:]  # the broken image
    one = runner.invoke(app, [*args, "--json", str(tmp_path / "one.json")])
    assert one.exit_code == 1, one.output
    two_data, one_data = (json.loads((tmp_path / f).read_text()) for f in ("two.json", "one.json"))
    assert two_data["dataset"]["scored"] == one_data["dataset"]["scored"] == 8
    assert two_data["thresholds_chosen_on"] == one_data["thresholds_chosen_on"]
    for method, res in one_data["results"].items():
        for metric, value in res.items():
            if isinstance(value, float):
                assert two_data["results"][method][metric] == pytest.approx(value, rel=1e-4), metric
    records = (tmp_path / "two.records.jsonl").read_text().splitlines()
    assert len(records) == 9 and not list(tmp_path.glob("two.records.rank*"))
