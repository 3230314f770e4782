"""Hostile inputs, faults and resources: every case a failed record or one clear line with the
right exit code — never a traceback, a hang, a torn file or a lost result."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import random_image
from PIL import Image
from typer.testing import CliRunner

from clipviz.cli import app
from clipviz.runs.manifest import LOCK, MANIFEST, latest_records

runner = CliRunner()


def _args(tiny_weights, tower="vit"):
    config, weights = tiny_weights[tower]
    return ["--model-config", str(config), "--pretrained", str(weights)]


def _one_line_error(result, code, text):
    assert result.exit_code == code, result.output
    assert text in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert "Traceback" not in result.output and "internal error" not in result.output


# -- names, links, folders ---------------------------------------------------------------------


def test_file_names_that_are_not_utf8_are_explained_and_resumed(tmp_path, tiny_weights):
    photos = tmp_path / "photos"
    photos.mkdir()
    name = os.fsdecode(b"caf\xe9.png")  # Latin-1 bytes: not UTF-8
    random_image(0).save(photos / name)
    out = tmp_path / "out"
    args = ["explain", str(photos), "a dog", "-o", str(out), "-q", *_args(tiny_weights)]
    for status in ("ok", "skipped"):
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        (rec,) = latest_records(out).values()
        assert rec["status"] == status and rec["input"] == str((photos / name).resolve())
    assert (out / name / "maps.npz").is_file()
    (out / MANIFEST).read_text(encoding="ascii")  # escaped: readable by any tool
    assert runner.invoke(app, ["report", str(out)]).exit_code == 0
    page = (out / "report.html").read_text(encoding="utf-8")
    from urllib.parse import unquote_to_bytes

    from test_report import _page_data

    data = _page_data(page)
    sources = [c["overlay"] for c in data["cards"]]
    sources += [f["src"] for v in data["images"].values() for p in v["prompts"] for f in p["files"]]
    assert sources and all((out / os.fsdecode(unquote_to_bytes(s))).is_file() for s in sources)


def test_links_that_go_nowhere_or_in_circles_are_failed_records(tmp_path, tiny_weights):
    photos = tmp_path / "photos"
    (photos / "sub").mkdir(parents=True)
    random_image(0).save(photos / "sub" / "good.png")
    (photos / "gone.jpg").symlink_to(tmp_path / "missing.jpg")
    (photos / "loop.png").symlink_to(photos / "loop.png")
    (photos / "sub" / "up").symlink_to(photos)  # a folder loop under -r
    out = tmp_path / "out"
    result = runner.invoke(
        app, ["explain", str(photos), "a dog", "-r", "-o", str(out), "-q", *_args(tiny_weights)]
    )
    assert result.exit_code == 1, result.output
    records = {Path(r["output"]).name: r for r in latest_records(out).values()}
    assert records["good.png"]["status"] == "ok"
    assert "dangling symbolic link" in records["gone.jpg"]["error"]
    assert "symbolic link" in records["loop.png"]["error"]
    assert len(records) == 3  # the looping folder is walked once


def test_listed_dangling_links_are_failed_records(tmp_path, tiny_weights):
    random_image(0).save(tmp_path / "good.png")
    (tmp_path / "gone.png").symlink_to(tmp_path / "missing.png")
    listing = tmp_path / "list.txt"
    listing.write_text(f"{tmp_path / 'good.png'}\n{tmp_path / 'gone.png'}\n")
    out = tmp_path / "out"
    result = runner.invoke(app, ["explain", "--inputs-file", str(listing), "a dog", "-o",
                                 str(out), "-q", *_args(tiny_weights)])  # fmt: skip
    assert result.exit_code == 1
    by_name = {Path(r["output"]).name: r for r in latest_records(out).values()}
    assert by_name["good.png"]["status"] == "ok" and by_name["gone.png"]["status"] == "failed"


def test_an_unreadable_subfolder_is_reported_not_skipped(tmp_path, tiny_weights, monkeypatch):
    photos = tmp_path / "photos"
    (photos / "locked").mkdir(parents=True)
    random_image(0).save(photos / "a.png")
    random_image(1).save(photos / "locked" / "b.png")
    real = os.scandir

    def scandir(path="."):  # tests run as root, where chmod 000 does not lock a folder
        if Path(path).name == "locked":
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    out = tmp_path / "out"
    result = runner.invoke(
        app, ["explain", str(photos), "a dog", "-r", "-o", str(out), "-q", *_args(tiny_weights)]
    )
    assert result.exit_code == 1, result.output
    records = {Path(r["output"]).name: r for r in latest_records(out).values()}
    assert records["a.png"]["status"] == "ok"
    assert records["locked"]["status"] == "failed"
    assert "cannot read folder: Permission denied" in records["locked"]["error"]


# -- memory ------------------------------------------------------------------------------------

AS_LIMIT_GB = 5  # torch alone maps ~3.6 GB of address space here


def test_a_100_megapixel_photo_is_explained_under_a_5_gb_address_space_limit(
    tmp_path, tiny_weights
):
    big = tmp_path / "big.png"
    image = Image.new("RGB", (10_000, 10_000), (120, 80, 40))
    image.paste((250, 30, 30), (2000, 3000, 6000, 7000))
    image.save(big, compress_level=1)
    del image
    code = (
        "import resource, sys\n"
        f"resource.setrlimit(resource.RLIMIT_AS, ({AS_LIMIT_GB << 30}, {AS_LIMIT_GB << 30}))\n"
        "from clipviz.cli import main\n"
        "sys.argv = ['clipviz', *sys.argv[1:]]\nmain()\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "2"}
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-c", code, "explain", str(big), "a red square", "-m", "itsm",
         "-m", "gradcam", "-o", str(out), "--workers", "0", "-q", *_args(tiny_weights)],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    (rec,) = latest_records(out).values()
    assert rec["status"] == "ok" and rec["size"] == [10_000, 10_000]
    overlay = Image.open(out / "big.png" / "a-red-square.itsm.overlay.png")
    assert overlay.size == (4096, 4096)  # rendered at the capped size


def test_a_coco_image_declaring_100000_squared_pixels_is_refused(tmp_path, vit_backend):
    from clipviz.data.datasets import open_dataset
    from clipviz.runs.evaluate import EvalOptions, evaluate

    images = tmp_path / "val2017"
    images.mkdir()
    random_image(0, size=(64, 64)).save(images / "a.png")
    random_image(1, size=(64, 64)).save(images / "huge.png")
    poly = [[1, 1, 40, 1, 40, 40, 1, 40]]
    doc = {
        "images": [{"id": 1, "file_name": "a.png", "width": 64, "height": 64},
                   {"id": 2, "file_name": "huge.png", "width": 100_000, "height": 100_000}],
        "annotations": [{"id": 1, "image_id": i, "category_id": 1, "segmentation": poly,
                         "bbox": [1, 1, 39, 39], "iscrowd": 0} for i in (1, 2)],
        "categories": [{"id": 1, "name": "square"}],
    }  # fmt: skip
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_val2017.json").write_text(json.dumps(doc))
    dataset = open_dataset(tmp_path, "coco")
    texts = vit_backend.encode_texts(dataset.classes, ensemble=False)
    _, records = evaluate(vit_backend, dataset, texts, EvalOptions(metrics=("msc",)),
                          tmp_path / "r.jsonl")  # fmt: skip
    status = {Path(r["image"]).name: r for r in records}
    assert status["a.png"]["status"] == "ok"
    assert status["huge.png"]["status"] == "failed"
    assert "100000x100000" in status["huge.png"]["error"]


# -- kills, full disks, two runs -----------------------------------------------------------------


def _children(pid: int) -> set[int]:
    found = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        children = (task / "children").read_text().split() if (task / "children").exists() else []
        found.update(int(c) for c in children)
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_decoding_workers_die_with_a_killed_run(tmp_path, tiny_weights):
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(400):
        random_image(i % 7, size=(320, 240)).save(photos / f"p{i:03d}.jpg")
    proc = subprocess.Popen(
        [sys.executable, "-m", "clipviz", "explain", str(photos), "a dog", "-b", "2",
         "--workers", "2", "-o", str(tmp_path / "out"), "-q", *_args(tiny_weights)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    workers: set[int] = set()
    deadline = time.time() + 120
    while time.time() < deadline and len(workers) < 2:
        workers = _children(proc.pid)
        time.sleep(0.2)
    assert len(workers) >= 2, "the run never started its decoding workers"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 15
    while time.time() < deadline and any(_alive(w) for w in workers):
        time.sleep(0.2)
    assert not any(_alive(w) for w in workers)


def test_half_written_files_of_a_killed_run_are_removed_and_a_torn_line_cut(tmp_path, tiny_weights):
    random_image(0).save(tmp_path / "a.png")
    out = tmp_path / "out"
    args = ["explain", str(tmp_path / "a.png"), "a dog", "-o", str(out), "-q", *_args(tiny_weights)]
    assert runner.invoke(app, args).exit_code == 0
    stale = out / "a.png" / ".a-dog.overlay.png.x1y2.tmp.png"
    stale.write_bytes(b"half a png")
    with open(out / MANIFEST, "a") as f:
        f.write('{"input": "torn')  # a run killed in the middle of a line
    assert runner.invoke(app, [*args, "--overwrite"]).exit_code == 0
    assert not stale.exists()
    lines = (out / MANIFEST).read_text().splitlines()
    assert all(json.loads(line) for line in lines) and len(lines) == 2


def test_a_full_disk_stops_the_run_in_one_line_and_keeps_what_is_done(
    tmp_path, tiny_weights, monkeypatch
):
    import clipviz.render as render
    import clipviz.runs.outputs as outputs

    for i in range(3):
        random_image(i).save(tmp_path / f"p{i}.png")
    real, calls = render.save_png, []

    def fill_up(path, rgb, palette=None):
        calls.append(path)
        if len(calls) > 2:  # the first image's two PNGs fit, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path, rgb, palette)

    monkeypatch.setattr(outputs, "save_png", fill_up)  # overlays
    monkeypatch.setattr(render, "save_png", fill_up)  # heatmaps
    out = tmp_path / "out"
    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"{tmp_path / f'p{i}.png'}\n" for i in range(3)))
    # written in the model's thread, so "the first image" is p0 (writer threads race for
    # the disk's last room: then whichever image finished first is the one kept)
    result = runner.invoke(app, ["explain", "--inputs-file", str(listing), "a dog", "-o",
                                 str(out), "-b", "1", "-q", "--writers", "0",
                                 *_args(tiny_weights)])  # fmt: skip
    _one_line_error(result, 1, "disk full writing")
    assert "finished results kept" in result.output
    records = list(latest_records(out).values())
    assert [Path(r["input"]).name for r in records] == ["p0.png"] and records[0]["status"] == "ok"
    assert not list((out / "p1.png").glob(".*.tmp*"))


def test_every_manifest_append_turns_a_full_disk_into_one_line(tmp_path, monkeypatch):
    # explain, eval and concepts all append through `append_record`
    from clipviz import ClipvizError
    from clipviz.runs import manifest

    def full(path, rec):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    path = tmp_path / MANIFEST
    manifest.append_record(path, {"input": "a"})
    monkeypatch.setattr(manifest, "append_jsonl", full)
    with pytest.raises(ClipvizError, match="disk full writing .*finished results kept") as err:
        manifest.append_record(path, {"input": "b"})
    assert err.value.exit_code == 1 and "\n" not in str(err.value)
    assert [r["input"] for r in latest_records(tmp_path).values()] == ["a"]
    assert latest_records(tmp_path)["a"]["versions"]["clipviz"]


def test_a_second_run_into_the_same_folder_is_refused(tmp_path, tiny_weights):
    from filelock import FileLock

    random_image(0).save(tmp_path / "a.png")
    out = tmp_path / "out"
    out.mkdir()
    with FileLock(str(out / LOCK)):
        result = runner.invoke(app, ["explain", str(tmp_path / "a.png"), "a dog", "-o", str(out),
                                     *_args(tiny_weights)])  # fmt: skip
    _one_line_error(result, 2, "another clipviz run is writing into")
    assert not (out / MANIFEST).exists()


def test_output_files_follow_the_umask(tmp_path, tiny_weights):
    random_image(0).save(tmp_path / "a.png")
    out = tmp_path / "out"
    old = os.umask(0o022)
    try:
        args = ["explain", str(tmp_path / "a.png"), "a dog", "-o", str(out), "-q",
                *_args(tiny_weights)]  # fmt: skip
        assert runner.invoke(app, args).exit_code == 0
    finally:
        os.umask(old)
    for name in ("a.png/maps.npz", "a.png/a-dog.overlay.png", "run.json"):
        assert (out / name).stat().st_mode & 0o777 == 0o644, name


def test_every_file_train_writes_follows_the_umask(tmp_path, tiny_weights, monkeypatch):
    from clipviz import files
    from clipviz.testbed.world import write_captions_csv

    write_captions_csv(tmp_path / "world", 16, seed=3, size=64)
    out = tmp_path / "run"
    args = ["train", str(tmp_path / "world" / "captions.csv"), "--out", str(out), "-b", "8",
            "--steps", "2", "--checkpoint-every", "1", "--workers", "0", "-q",
            *_args(tiny_weights)]  # fmt: skip
    old = os.umask(0o022)
    files._umask.cache_clear()
    try:
        result = runner.invoke(app, args)
    finally:
        os.umask(old)
        files._umask.cache_clear()
    assert result.exit_code == 0, result.output
    written = {p.name: p.stat().st_mode & 0o777 for p in out.rglob("*") if p.is_file()}
    assert {"checkpoint.safetensors", "eclip.safetensors", "metrics.jsonl"} <= set(written)
    assert written == dict.fromkeys(written, 0o644)


# -- configuration errors and prompts ------------------------------------------------------------


@pytest.fixture
def bad_configs(tmp_path):
    cfg = json.loads((Path(__file__).parent / "configs" / "tiny-vit.json").read_text())
    latin = tmp_path / "latin1.json"
    latin.write_bytes(json.dumps(cfg).replace("embed_dim", "embed_dim").encode() + b"\xe9")
    zero = tmp_path / "ctx0.json"
    zero.write_text(json.dumps({**cfg, "text_cfg": {**cfg["text_cfg"], "context_length": 0}}))
    return {"latin": latin, "zero": zero}


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--workers", "-1"], "--workers -1 must be 0"),
        (["--resolution", "100000"], "--resolution 100000 is outside 32…4096"),
        (["--max-pixels", "0"], "--max-pixels 0 must be at least 1"),
        (["-m", "surgery", "--surgery-depth", "99"], "surgery: depth=99 is outside 1…2"),
        (["-b", "0"], "--batch-size 0 must be at least 1"),
    ],
)
def test_bad_options_exit_2_in_one_line(tmp_path, tiny_weights, extra, message):
    random_image(0).save(tmp_path / "a.png")
    result = runner.invoke(app, ["explain", str(tmp_path / "a.png"), "a dog", "-o",
                                 str(tmp_path / "o"), *extra, *_args(tiny_weights)])  # fmt: skip
    _one_line_error(result, 2, message)


def test_an_out_that_is_a_file_exits_2(tmp_path, tiny_weights):
    random_image(0).save(tmp_path / "a.png")
    (tmp_path / "o").write_text("a file")
    result = runner.invoke(app, ["explain", str(tmp_path / "a.png"), "a dog", "-o",
                                 str(tmp_path / "o"), *_args(tiny_weights)])  # fmt: skip
    _one_line_error(result, 2, "is a file; pass a folder")


@pytest.mark.parametrize("which,message", [("latin", "; fix the file, or save it as a UTF-8 JSON"),
                                           ("zero", "context_length is 0")])  # fmt: skip
def test_broken_model_configs_exit_2_in_one_line(tmp_path, bad_configs, which, message):
    random_image(0).save(tmp_path / "a.png")
    result = runner.invoke(app, ["explain", str(tmp_path / "a.png"), "a dog", "--model-config",
                                 str(bad_configs[which]), "--pretrained", "random"])  # fmt: skip
    _one_line_error(result, 2, message)


def test_a_generic_dataset_without_masks_or_boxes_exits_2(tmp_path, tiny_weights):
    (tmp_path / "images").mkdir()
    random_image(0).save(tmp_path / "images" / "a.png")
    result = runner.invoke(app, ["eval", str(tmp_path), "--format", "generic",
                                 *_args(tiny_weights)])  # fmt: skip
    _one_line_error(result, 2, "nothing to score the maps against")


def test_a_resume_checkpoint_with_missing_keys_exits_2(tmp_path, tiny_weights):
    from safetensors.torch import load_file, save_file

    from clipviz.testbed.world import write_captions_csv

    write_captions_csv(tmp_path / "world", 40, seed=3, size=64)
    out = tmp_path / "run"
    args = ["train", str(tmp_path / "world" / "captions.csv"), "--out", str(out), "-b", "8",
            "--steps", "2", "--checkpoint-every", "1", "--workers", "0", "-q",
            *_args(tiny_weights)]  # fmt: skip
    assert runner.invoke(app, args).exit_code == 0
    ckpt = out / "checkpoint.safetensors"
    from safetensors import safe_open

    with safe_open(str(ckpt), framework="pt") as f:
        meta = f.metadata()
    tensors = {k: v for k, v in load_file(str(ckpt)).items() if k != "train.step"}
    save_file(tensors, str(ckpt), metadata=meta)
    (out / "eclip.safetensors").unlink()
    result = runner.invoke(app, [*args, "--resume"])
    _one_line_error(result, 2, "it lacks train.step")


def test_blank_prompts_exit_2_and_long_ones_are_warned_about_once(tmp_path, tiny_weights):
    random_image(0).save(tmp_path / "a.png")
    base = ["explain", str(tmp_path / "a.png"), "-o", str(tmp_path / "o"), *_args(tiny_weights)]
    _one_line_error(runner.invoke(app, [*base, "a dog", "   "]), 2, "blank prompt")
    long = " ".join(["word"] * 40)  # the tiny model's context is 32 tokens
    result = runner.invoke(app, [*base, "-q", long, f"{long} again", "a dog"])
    assert result.exit_code == 0, result.output
    assert result.output.count("exceed the text tower's context length") == 1
    assert "and 1 more" in result.output


@pytest.mark.parametrize(
    "content,message",
    [
        (b"a dog\n\x01\x02\x1b\n", "1 blank prompt"),
        (b"a dog\n\xe2\x80\x8b\x7f \n", "1 blank prompt"),  # zero-width space, DEL
        (b"a dog\nca\x00t\n", "holds a NUL byte"),
    ],
)
def test_prompts_of_control_characters_or_with_a_nul_exit_2(
    tmp_path, tiny_weights, content, message
):
    random_image(0).save(tmp_path / "a.png")
    (tmp_path / "prompts.txt").write_bytes(content)
    result = runner.invoke(app, ["explain", str(tmp_path / "a.png"), "--prompts-file",
                                 str(tmp_path / "prompts.txt"), "-o", str(tmp_path / "o"),
                                 *_args(tiny_weights)])  # fmt: skip
    _one_line_error(result, 2, message)
    assert not (tmp_path / "o" / "a.png").exists()


def test_the_library_refuses_blank_and_nul_prompts_before_encoding(vit_backend, monkeypatch):
    import clipviz
    from clipviz import ClipvizError

    monkeypatch.setattr(vit_backend, "encode_texts", lambda *a, **k: pytest.fail("encoded"))
    image = torch.zeros(1, 3, 32, 32)
    for prompts, message in ((["a dog", "\x07"], "1 blank prompt"),
                             (["a\x00dog"], "holds a NUL byte")):  # fmt: skip
        with pytest.raises(ClipvizError, match=message) as e:
            clipviz.explain(vit_backend, image, prompts)
        assert e.value.exit_code == 2


def test_runs_refuse_blank_and_nul_prompts_like_the_cli():
    from clipviz import ClipvizError
    from clipviz.runs.explain import check_prompts

    for prompts, message in ((["a dog", "\x1b\x07"], "1 blank prompt"),
                             (["a dog", "\x00"], "holds a NUL byte")):  # fmt: skip
        with pytest.raises(ClipvizError, match=message):
            check_prompts(prompts)


def test_prompt_embeddings_are_cached_chunk_by_chunk(vit_backend, monkeypatch):
    from clipviz.backend import text

    monkeypatch.setattr(text, "PROMPT_CHUNK", 3)
    cache = text.TextCache(None)
    prompts = [f"thing number {i}" for i in range(8)]
    calls, seen = [], []

    def embed(chunk, ensemble):
        calls.append(len(chunk))
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed while the second chunk runs
        return vit_backend.embed_texts(chunk, ensemble)

    with pytest.raises(KeyboardInterrupt):
        cache.get(prompts, False, embed, lambda done, total: seen.append((done, total)))
    assert calls == [3, 3] and seen == [(3, 8)]
    assert len(cache.memory) == 3  # the first chunk survives
    calls.clear()
    rows = cache.get(prompts, False, vit_backend.embed_texts)
    assert len(rows) == 8 and torch.stack(rows).shape[0] == 8


def test_the_eval_table_keeps_its_numbers_when_piped(tmp_path, tiny_weights):
    from clipviz.testbed.world import write_voc

    write_voc(tmp_path / "voc", 4, seed=2, size=64)
    result = runner.invoke(app, ["eval", str(tmp_path / "voc"), "--metric", "msc", "--metric",
                                 "pointing", "--json", str(tmp_path / "r.json"),
                                 *_args(tiny_weights)])  # fmt: skip
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "r.json").read_text())["results"]["itsm"]
    assert f"{saved['msc']:.1f}" in result.output and f"{saved['pointing']:.3f}" in result.output
    assert "…" not in result.output


def test_train_and_eval_take_file_names_that_are_not_utf8(tmp_path, tiny_weights):
    from clipviz.testbed.world import make_scenes

    stem = os.fsdecode(b"sc\xe8ne")  # Latin-1 bytes: not UTF-8
    scenes = make_scenes(9, seed=4, size=64, n_objects=1)
    folder = tmp_path / "captions"
    folder.mkdir()
    for i, scene in enumerate(scenes):
        Image.fromarray(scene.image).save(folder / f"{stem}{i}.png")
        (folder / f"{stem}{i}.txt").write_text(f"a {scene.objects[0].name}")
    result = runner.invoke(app, ["train", str(folder), "--out", str(tmp_path / "run"), "-b", "4",
                                 "--steps", "1", "--workers", "0", "-q", *_args(tiny_weights)])  # fmt: skip
    assert result.exit_code == 0, result.output
    generic = tmp_path / "generic"
    (generic / "images").mkdir(parents=True)
    (generic / "masks" / stem).mkdir(parents=True)
    Image.fromarray(scenes[0].image).save(generic / "images" / f"{stem}.png")
    mask = (scenes[0].objects[0].mask * 255).astype("uint8")
    Image.fromarray(mask).save(generic / "masks" / stem / "object.png")
    out = tmp_path / "eval.json"
    result = runner.invoke(app, ["eval", str(generic), "--format", "generic", "--metric", "msc",
                                 "--json", str(out), "-q", *_args(tiny_weights)])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["results"]["itsm"]["pairs"] == 1
