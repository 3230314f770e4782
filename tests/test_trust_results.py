"""No silently wrong result: centre-crop maps placed where the crop came from, models and
inputs identified by content, repeated prompts, non-finite weights and maps, stale files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import random_image, save_random_weights, write_cub
from PIL import Image
from typer.testing import CliRunner

import clipviz
from clipviz import ClipvizError
from clipviz.backend import load_backend
from clipviz.cli import app
from clipviz.data.datasets import Sample, open_dataset
from clipviz.data.datasets.common import crop_sample
from clipviz.maps import upsample_normalized
from clipviz.render import load_npz
from clipviz.runs.evaluate import EvalOptions, evaluate, score_pair
from clipviz.runs.manifest import latest_records

runner = CliRunner()


def _args(config, weights):
    return ["--model-config", str(config), "--pretrained", str(weights)]


# -- --crop center ----------------------------------------------------------------------------


def test_centre_crop_maps_sit_on_the_crop_and_nothing_outside(tmp_path, tiny_weights):
    config, weights = tiny_weights["vit"]
    random_image(0, size=(200, 100)).save(tmp_path / "wide.png")
    out = tmp_path / "out"
    result = runner.invoke(
        app, ["explain", str(tmp_path / "wide.png"), "a dog", "--crop", "center", "-o", str(out),
              "-q", *_args(config, weights)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    npz = load_npz(out / "wide.png" / "maps.npz")
    # the model saw the centre 100x100 of the 200x100 photo: columns 50…150
    assert list(npz["crop"]) == [50, 0, 150, 100] and list(npz["size"]) == [200, 100]
    heat = np.asarray(Image.open(out / "wide.png" / "a-dog.heatmap.png"))
    assert heat.shape == (100, 200, 4)
    assert (heat[:, :50, 3] == 0).all() and (heat[:, 150:, 3] == 0).all()  # no data: clear
    assert (heat[:, 50:150, 3] == 255).all()
    photo = np.asarray(Image.open(tmp_path / "wide.png").convert("RGB"))
    over = np.asarray(Image.open(out / "wide.png" / "a-dog.overlay.png"))
    np.testing.assert_array_equal(over[:, :50], photo[:, :50])  # the bare photo outside
    assert not np.array_equal(over[:, 50:150], photo[:, 50:150])
    # inside, the map is the raw map upsampled onto the crop alone
    expected = upsample_normalized(torch.from_numpy(npz["maps"]), (100, 100)).numpy()
    got = npz["upsampled"][:, :, 50:150].astype(np.float64) / 255
    np.testing.assert_allclose(got, expected, atol=1 / 255 + 1e-6)
    assert (npz["upsampled"][:, :, :50] == 0).all()


def test_crop_sample_cuts_masks_boxes_and_drops_classes_left_outside():
    masks = {"in": np.zeros((100, 200), bool), "out": np.zeros((100, 200), bool)}
    masks["in"][10:20, 60:80] = True
    masks["out"][10:20, 0:30] = True
    sample = Sample(Path("x.png"), (200, 100), masks,
                    {"in": [(60, 10, 80, 20)], "out": [(0, 10, 30, 20)]})  # fmt: skip
    cut = crop_sample(sample, (50, 0, 150, 100))
    assert cut.size == (100, 100) and cut.classes == ["in"]
    assert cut.masks["in"].shape == (100, 100) and cut.masks["in"][10:20, 10:30].all()
    assert cut.boxes == {"in": [(10, 10, 30, 20)]}


def test_centre_crop_eval_scores_the_crop_only(tmp_path, vit_backend, tiny_weights):
    root = tmp_path / "generic"
    (root / "images").mkdir(parents=True)
    random_image(1, size=(200, 100)).save(root / "images" / "a.png")
    for name, cols in (("left", slice(0, 40)), ("middle", slice(70, 130))):
        mask = np.zeros((100, 200), np.uint8)
        mask[20:80, cols] = 255
        (root / "masks" / "a").mkdir(parents=True, exist_ok=True)
        Image.fromarray(mask).save(root / "masks" / "a" / f"{name}.png")
    config, weights = tiny_weights["vit"]
    cropped = load_backend(model_config=config, pretrained=str(weights), device="cpu",
                           crop="center")  # fmt: skip
    dataset = open_dataset(root, "generic")
    texts = cropped.encode_texts(dataset.classes, ensemble=False)
    opts = EvalOptions(methods=("itsm",), metrics=("msc", "pointing", "energy"))
    _, records = evaluate(cropped, dataset, texts, opts, tmp_path / "r.jsonl")
    (rec,) = records
    assert [p["class"] for p in rec["pairs"]] == ["middle"]  # "left" lies outside the crop
    image = cropped.preprocess(Image.open(root / "images" / "a.png"))[None]
    exp = clipviz.explain(cropped, image, texts, "itsm")
    sample = crop_sample(dataset[0], (50, 0, 150, 100))
    t = dataset.classes.index("middle")
    norm = upsample_normalized(exp.maps[0, t : t + 1], (100, 100))[0].numpy()
    expected = score_pair(norm, sample, "middle", opts.metrics, 15)
    for key in ("msc", "pointing", "energy", "area"):
        assert rec["pairs"][0][key] == pytest.approx(expected[key])
    assert rec["pairs"][0]["area"] == pytest.approx(60 * 60 / (100 * 100))


# -- identity by content ---------------------------------------------------------------------


def test_weights_are_identified_by_their_bytes(tmp_path, tiny_weights):
    config, weights = tiny_weights["vit"]
    copy = tmp_path / "elsewhere" / "same.safetensors"
    copy.parent.mkdir()
    shutil.copy(weights, copy)
    a = load_backend(model_config=config, pretrained=str(weights), device="cpu")
    b = load_backend(model_config=config, pretrained=str(copy), device="cpu")
    assert a.identity["weights"] == b.identity["weights"] and a.key == b.key
    save_random_weights(config, copy, seed=5)  # other weights under the same path
    c = load_backend(model_config=config, pretrained=str(copy), device="cpu")
    assert c.identity["weights"] != a.identity["weights"] and c.key != a.key
    assert c.identity["weights"].startswith("sha256:")


def test_changed_weights_at_the_same_path_redo_images_and_refuse_old_checkpoints(
    tmp_path, tiny_weights
):
    from clipviz.eclip.head import ExplainHead, base_identity, load_head
    from clipviz.eclip.state import save_checkpoint

    config, original = tiny_weights["vit"]
    weights = tmp_path / "w.safetensors"
    shutil.copy(original, weights)
    random_image(0).save(tmp_path / "a.png")
    out = tmp_path / "out"
    args = ["explain", str(tmp_path / "a.png"), "a dog", "-o", str(out), "-q",
            *_args(config, weights)]  # fmt: skip
    assert runner.invoke(app, args).exit_code == 0
    first = load_npz(out / "a.png" / "maps.npz")["maps"]
    b = load_backend(model_config=config, pretrained=str(weights), device="cpu")
    ckpt = tmp_path / "eclip.safetensors"
    meta = {"base": json.dumps(base_identity(b), sort_keys=True), "config": "{}"}
    save_checkpoint(ckpt, ExplainHead(b), b.model.logit_scale.detach(), 1, meta)

    moved = tmp_path / "moved" / "w.safetensors"  # the same bytes elsewhere: accepted
    moved.parent.mkdir()
    shutil.copy(weights, moved)
    load_head(load_backend(model_config=config, pretrained=str(moved), device="cpu"), ckpt)

    save_random_weights(config, weights, seed=7)
    assert runner.invoke(app, args).exit_code == 0
    (rec,) = latest_records(out).values()
    assert rec["status"] == "ok"  # redone, not skipped
    assert not np.allclose(load_npz(out / "a.png" / "maps.npz")["maps"], first)
    changed = load_backend(model_config=config, pretrained=str(weights), device="cpu")
    with pytest.raises(ClipvizError, match="was trained for"):
        load_head(changed, ckpt)


def test_text_cache_of_changed_weights_is_not_reused(tmp_path, tiny_weights):
    config, original = tiny_weights["vit"]
    weights = tmp_path / "w.safetensors"
    shutil.copy(original, weights)
    before = load_backend(model_config=config, pretrained=str(weights)).encode_texts(["a cat"])
    save_random_weights(config, weights, seed=9)
    after = load_backend(model_config=config, pretrained=str(weights))
    fresh = after.embed_texts(["a cat"], True)[0]
    got = after.encode_texts(["a cat"]).embeddings[0]
    torch.testing.assert_close(got, fresh)
    assert not torch.allclose(got, before.embeddings[0])


@pytest.mark.open_clip
def test_local_dir_models_are_identified_by_config_and_weights(tmp_path, tiny_weights):
    config, weights = tiny_weights["vit"]
    folder = tmp_path / "model"
    folder.mkdir()
    cfg = json.loads(config.read_text())
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
    shutil.copy(weights, folder / "open_clip_model.safetensors")
    a = load_backend(f"local-dir:{folder}", device="cpu")
    save_random_weights(config, folder / "open_clip_model.safetensors", seed=3)
    b = load_backend(f"local-dir:{folder}", device="cpu")
    assert a.identity["weights"] != b.identity["weights"] and a.key != b.key


def test_a_replaced_input_file_is_done_again(tmp_path, tiny_weights):
    config, weights = tiny_weights["vit"]
    path = tmp_path / "photos" / "a.png"
    path.parent.mkdir()
    random_image(0).save(path)
    out = tmp_path / "out"
    args = ["explain", str(path.parent), "a dog", "-o", str(out), "-q", *_args(config, weights)]
    assert runner.invoke(app, args).exit_code == 0
    assert runner.invoke(app, args).exit_code == 0
    assert latest_records(out)[str(path.resolve())]["status"] == "skipped"
    random_image(5).save(path)  # same name, other picture
    assert runner.invoke(app, args).exit_code == 0
    assert latest_records(out)[str(path.resolve())]["status"] == "ok"


# -- what users type that used to go wrong ---------------------------------------------------


def test_rerunning_in_the_photo_folder_never_explains_its_own_outputs(
    tmp_path, tiny_weights, monkeypatch
):
    config, weights = tiny_weights["vit"]
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(2):
        random_image(i).save(photos / f"p{i}.png")
    monkeypatch.chdir(photos)
    args = ["explain", ".", "a dog", "-r", "-q", *_args(config, weights)]
    for _ in range(2):
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
    records = latest_records(photos / "clipviz-out")
    assert sorted(Path(r).name for r in records) == ["p0.png", "p1.png"]


def test_rerunning_an_image_with_fewer_prompts_removes_the_files_it_no_longer_writes(
    tmp_path, tiny_weights
):
    config, weights = tiny_weights["vit"]
    random_image(0).save(tmp_path / "a.png")
    out = tmp_path / "out"
    base = ["explain", str(tmp_path / "a.png"), "-o", str(out), "-q", *_args(config, weights)]
    assert (
        runner.invoke(app, [*base, "a dog", "grass", "-m", "itsm", "-m", "random"]).exit_code == 0
    )
    assert (out / "a.png" / "comparison.png").is_file()
    assert runner.invoke(app, [*base, "a dog"]).exit_code == 0
    files = sorted(p.name for p in (out / "a.png").iterdir())
    assert files == ["a-dog.heatmap.png", "a-dog.overlay.png", "maps.npz"]


def test_non_finite_weights_are_refused_at_load(tmp_path, tiny_weights):
    from safetensors.torch import load_file, save_file

    config, weights = tiny_weights["vit"]
    state = load_file(str(weights))
    name = next(k for k in state if k.endswith("proj") and state[k].is_floating_point())
    state[name][0, 0] = float("nan")
    bad = tmp_path / "nan.safetensors"
    save_file(state, str(bad))
    with pytest.raises(ClipvizError, match=f"non-finite values.*{name}") as e:
        load_backend(model_config=config, pretrained=str(bad), device="cpu")
    assert e.value.exit_code == 2


def test_non_finite_eclip_heads_are_refused(tmp_path, vit_backend):
    from clipviz.eclip.head import ExplainHead, base_identity, load_head
    from clipviz.eclip.state import save_checkpoint

    head = ExplainHead(vit_backend)
    with torch.no_grad():
        head.proj[0, 0] = float("inf")
    path = tmp_path / "bad.safetensors"
    meta = {"base": json.dumps(base_identity(vit_backend), sort_keys=True), "config": "{}"}
    save_checkpoint(path, head, vit_backend.model.logit_scale.detach(), 1, meta)
    with pytest.raises(ClipvizError, match="non-finite values"):
        load_head(vit_backend, path)


def test_a_non_finite_map_is_a_failed_record_not_an_ok_one(tmp_path, tiny_weights, monkeypatch):
    import clipviz.runs.explain as run

    config, weights = tiny_weights["vit"]
    for i in range(2):
        random_image(i).save(tmp_path / f"p{i}.png")
    real = run.explain

    def second_image_nan(*args, **kwargs):
        exp = real(*args, **kwargs)
        exp.maps[1:] = float("nan")
        return exp

    monkeypatch.setattr(run, "explain", second_image_nan)
    out = tmp_path / "out"
    listing = tmp_path / "list.txt"
    listing.write_text(f"{tmp_path / 'p0.png'}\n{tmp_path / 'p1.png'}\n")
    result = runner.invoke(app, ["explain", "--inputs-file", str(listing), "a dog", "-o", str(out),
                                 "-q", *_args(config, weights)])  # fmt: skip
    assert result.exit_code == 1, result.output
    status = {Path(k).name: r for k, r in latest_records(out).items()}
    assert status["p0.png"]["status"] == "ok"
    assert status["p1.png"]["status"] == "failed"
    assert "non-finite maps" in status["p1.png"]["error"]


def test_voc_image_and_mask_of_different_sizes_is_a_failed_image(tmp_path, vit_backend):
    from clipviz.testbed.world import write_voc

    root = tmp_path / "voc"
    write_voc(root, 3, seed=1, size=64)
    first = sorted((root / "JPEGImages").iterdir())[0]
    Image.open(first).resize((80, 64)).save(first)
    dataset = open_dataset(root, "voc")
    texts = vit_backend.encode_texts(dataset.classes, ensemble=False)
    _, records = evaluate(vit_backend, dataset, texts, EvalOptions(metrics=("msc",)),
                          tmp_path / "r.jsonl")  # fmt: skip
    failed = [r for r in records if r["status"] == "failed"]
    assert len(failed) == 1 and "80x64 but its labels" in failed[0]["error"]
    assert sum(r["status"] == "ok" for r in records) == 2


def test_every_voc_and_coco_class_has_a_wordnet_synset():
    from clipviz.convis.classes import COCO_SYNSETS, VOC_SYNSETS
    from clipviz.convis.nouns import noun_database
    from clipviz.data.datasets import VOC_CLASSES

    db = noun_database()
    assert list(VOC_SYNSETS) == VOC_CLASSES and len(COCO_SYNSETS) == 80
    for synset in [*VOC_SYNSETS.values(), *COCO_SYNSETS.values()]:
        assert synset in db.position, synset


def test_convis_eval_on_voc_class_names_uses_the_shipped_synsets():
    from clipviz.convis.classes import VOC_SYNSETS
    from clipviz.data.datasets import VOC_CLASSES, EvalDataset
    from clipviz.runs.evaluate import with_class_synsets

    dataset = EvalDataset("voc", Path("."), "voc", list(VOC_CLASSES), [], lambda e: e)
    opts = with_class_synsets(EvalOptions(methods=("itsm", "convis")), dataset)
    assert opts.method_options["convis"]["synsets"] == [VOC_SYNSETS[c] for c in VOC_CLASSES]
    chosen = EvalOptions(methods=("convis",), method_options={"convis": {"synsets": ["bird.n.01"]}})
    assert with_class_synsets(chosen, dataset) == chosen  # the user's choice wins


def test_eval_on_a_box_only_layout_defaults_to_the_metrics_it_supports(tmp_path, tiny_weights):
    config, weights = tiny_weights["vit"]
    out = tmp_path / "r.json"
    result = runner.invoke(app, ["eval", str(write_cub(tmp_path / "cub")), "--format", "cub",
                                 "--json", str(out), *_args(config, weights)])  # fmt: skip
    assert result.exit_code == 0, result.output
    saved = json.loads(out.read_text())
    assert saved["metrics"] == ["pointing", "energy", "maxboxacc"]
    assert saved["results"]["itsm"]["pairs"] == 2


def test_eclip_flag_alone_runs_eclip_and_bench_adds_it(tmp_path, tiny_weights, vit_backend):
    from clipviz.eclip.head import ExplainHead, base_identity
    from clipviz.eclip.state import save_checkpoint

    config, weights = tiny_weights["vit"]
    ckpt = tmp_path / "eclip.safetensors"
    meta = {"base": json.dumps(base_identity(vit_backend), sort_keys=True), "config": "{}"}
    save_checkpoint(ckpt, ExplainHead(vit_backend), vit_backend.model.logit_scale, 1, meta)
    random_image(0).save(tmp_path / "a.png")
    out = tmp_path / "out"
    result = runner.invoke(app, ["explain", str(tmp_path / "a.png"), "a dog", "--eclip",
                                 str(ckpt), "-o", str(out), "-q", *_args(config, weights)])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert list(load_npz(out / "a.png" / "maps.npz")["methods"]) == ["eclip"]
    bench = tmp_path / "bench.json"
    result = runner.invoke(app, ["bench", "-m", "itsm", "--eclip", str(ckpt), "--repeats", "1",
                                 "-b", "1", "--json", str(bench), *_args(config, weights)])  # fmt: skip
    assert result.exit_code == 0, result.output
    rows = [r["name"] for r in json.loads(bench.read_text())["rows"]]
    assert rows == ["forward (encode_image)", "itsm", "eclip"]


def test_bench_times_convis_on_noun_prompts(tmp_path, tiny_weights):
    config, weights = tiny_weights["vit"]
    vocab = tmp_path / "words.txt"
    vocab.write_text("dog\ncat\ncar\n")
    bench = tmp_path / "bench.json"
    result = runner.invoke(app, ["bench", "-m", "convis", "-O", f"vocabulary={vocab}", "-O",
                                 "variant=dense", "--prompts", "2", "--repeats", "1", "-b", "1",
                                 "--json", str(bench), *_args(config, weights)])  # fmt: skip
    assert result.exit_code == 0, result.output
    (forward, convis) = json.loads(bench.read_text())["rows"]
    assert convis["name"] == "convis" and convis["ratio"] > 0
