"""Run folders: one run.json writer with a `kind`, folders clipviz did not write are left
alone, unwritable folders are one line, and torchrun jobs end the same way on every rank."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import tarfile

import pytest
from conftest import random_image, torchrun_two, write_cub
from typer.testing import CliRunner

from clipviz import ClipvizError
from clipviz.cli import app
from clipviz.runs.manifest import MANIFEST, latest_records
from clipviz.runs.run_json import read_run_json, run_kind
from clipviz.runs.shards import is_shard_run
from clipviz.testbed.world import write_captions_csv

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_thread")


def _model_args(tiny_weights):
    config, weights = tiny_weights["vit"]
    return ["--model-config", str(config), "--pretrained", str(weights), "--device", "cpu"]


def _one_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1, output
    return lines[0]


def _png(seed: int) -> bytes:
    buffer = io.BytesIO()
    random_image(seed, (48, 40)).save(buffer, format="PNG")
    return buffer.getvalue()


def _shard(path, keys):
    with tarfile.open(path, "w") as tar:
        for i, key in enumerate(keys):
            data = _png(i)
            info = tarfile.TarInfo(f"{key}.png")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_every_run_json_has_its_kind_and_the_versions_that_wrote_it(tmp_path, tiny_weights):
    random_image(0).save(tmp_path / "a.png")
    _shard(tmp_path / "s0.tar", ["x"])
    base = ["a red square", "-q", "--workers", "0", *_model_args(tiny_weights)]
    for name, source in (("images", "a.png"), ("shards", "s0.tar")):
        result = runner.invoke(app, ["explain", str(tmp_path / source), *base, "-o",
                                     str(tmp_path / name)])  # fmt: skip
        assert result.exit_code == 0, result.output
    images, shards = (read_run_json(tmp_path / n) for n in ("images", "shards"))
    assert (images["kind"], shards["kind"]) == ("explain", "shards")
    for run in (images, shards):
        assert run["schema_version"] >= 1 and run["methods"] == ["itsm"]
        assert set(run["versions"]) >= {"clipviz", "open_clip", "torch", "timm", "transformers"}
        assert run["versions"]["timm"] and run["versions"]["transformers"]
    record = next(iter(latest_records(tmp_path / "images").values()))
    assert record["versions"]["timm"] == images["versions"]["timm"]
    assert is_shard_run(tmp_path / "shards") and not is_shard_run(tmp_path / "images")


@pytest.mark.parametrize(
    ("run", "kind"),
    [
        ({"schema_version": 1, "model": {}, "methods": ["itsm"], "prompts": ["a"]}, "explain"),
        ({"schema_version": 1, "methods": ["itsm"], "shards": ["/d/0.tar"]}, "shards"),
        ({"schema_version": 1, "method": "convis-full", "concepts": ["dog.n.01"]}, "concepts"),
        ({"schema_version": 1, "base": {}, "config": {}, "world_size": 1}, "train"),
    ],
)
def test_a_run_json_written_before_kinds_is_read_as_its_kind(tmp_path, run, kind):
    (tmp_path / "run.json").write_text(json.dumps(run))
    assert run_kind(tmp_path) == kind
    assert read_run_json(tmp_path) == {**run, "kind": kind}
    assert is_shard_run(tmp_path) == (kind == "shards")


def test_a_folder_of_other_files_is_refused_and_left_as_it_was(tmp_path, tiny_weights):
    random_image(0).save(tmp_path / "a.png")
    out = tmp_path / "mine"
    (out / "a.png").mkdir(parents=True)
    (out / "a.png" / "maps.npz").write_bytes(b"the user's own file")
    (out / MANIFEST).write_text("my notes\n")
    args = ["explain", str(tmp_path / "a.png"), "dog", "-o", str(out), "-q", "--workers", "0",
            *_model_args(tiny_weights)]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    line = _one_line(result.output)
    assert "not a clipviz run" in line and "--overwrite" in line
    assert (out / "a.png" / "maps.npz").read_bytes() == b"the user's own file"
    assert (out / MANIFEST).read_text() == "my notes\n" and not (out / "run.json").exists()
    concepts = runner.invoke(app, ["concepts", str(tmp_path / "a.png"), "--synset", "dog.n.01",
                                   "-o", str(out), *_model_args(tiny_weights)])  # fmt: skip
    assert concepts.exit_code == 2 and "not a clipviz run" in _one_line(concepts.output)
    result = runner.invoke(app, [*args, "--overwrite"])  # the user asked for it
    assert result.exit_code == 0, result.output
    assert run_kind(out) == "explain"


def test_a_run_of_another_kind_is_not_written_over(tmp_path, tiny_weights):
    random_image(0).save(tmp_path / "a.png")
    out = tmp_path / "trained"
    out.mkdir()
    (out / "run.json").write_text(json.dumps({"schema_version": 1, "base": {}, "config": {}}))
    args = ["explain", str(tmp_path / "a.png"), "dog", "-o", str(out), "-q",
            *_model_args(tiny_weights)]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert "holds a clipviz training run" in _one_line(result.output)
    assert json.loads((out / "run.json").read_text())["config"] == {}


def test_training_into_a_folder_of_other_files_is_refused(tmp_path, vit_backend):
    from clipviz.data.captions import read_captions
    from clipviz.eclip.config import TrainConfig
    from clipviz.eclip.train import train

    write_captions_csv(tmp_path / "data", 4, seed=0, size=32)
    data = read_captions(tmp_path / "data" / "captions.csv")
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text("mine\n")
    with pytest.raises(ClipvizError, match="not a clipviz run"):
        train(vit_backend, data, out, TrainConfig(batch_size=4, steps=1, workers=0))
    assert (out / "metrics.jsonl").read_text() == "mine\n"


def test_eval_results_are_never_written_over_a_file_clipviz_did_not_write(tmp_path, tiny_weights):
    results = tmp_path / "results.json"
    results.write_text('{"mine": true}')
    args = ["eval", str(write_cub(tmp_path / "cub")), "--format", "cub", "--json", str(results),
            *_model_args(tiny_weights)]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert "is not clipviz results" in _one_line(result.output)
    assert results.read_text() == '{"mine": true}' and not results.with_suffix(".csv").exists()
    results.unlink()
    assert runner.invoke(app, args).exit_code == 0
    assert runner.invoke(app, args).exit_code == 0  # its own results are replaced


@contextlib.contextmanager
def _immutable(folder):
    """`folder` that not even root can write into (ext4's immutable attribute)."""
    folder.mkdir()
    if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not available here; it is how the test stops root writing")
    try:
        yield folder
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)


def test_an_unwritable_out_is_a_usage_error_in_one_line(tmp_path, tiny_weights):
    random_image(0).save(tmp_path / "a.png")
    with _immutable(tmp_path / "locked") as locked:
        for out in (locked, locked / "new"):
            result = runner.invoke(app, ["explain", str(tmp_path / "a.png"), "dog", "-o",
                                         str(out), "-q", *_model_args(tiny_weights)])  # fmt: skip
            assert result.exit_code == 2
            line = _one_line(result.output)
            assert "is not writable" in line and "internal error" not in line
        assert list(locked.iterdir()) == []


def test_torchrun_shard_that_cannot_be_written_fails_alone_and_rank0_ends_the_job(
    tmp_path, tiny_weights
):
    data = tmp_path / "data"
    data.mkdir()
    _shard(data / "s0.tar", ["a", "b"])
    _shard(data / "s1.tar", ["c", "d", "e"])
    out = tmp_path / "out"
    (out / "shards" / "s1.tar").mkdir(parents=True)  # rank 1's output shard cannot be written
    proc = torchrun_two(["explain", str(data / "*.tar"), "a red square", "--workers", "0",
                         "--overwrite", "--report", "-o", str(out), *_model_args(tiny_weights)])  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-3000:]  # torchrun's own report follows
    assert "internal error" not in proc.stderr and "gloo" not in proc.stderr.lower()
    records = {r["output"]: r for r in latest_records(out).values()}
    assert records["shards/s0"]["status"] == "ok" and records["shards/s0"]["samples"] == 2
    assert records["shards/s1"]["status"] == "failed"
    assert "could not write" in records["shards/s1"]["error"]
    # the job's shards and samples, counted together; rank 0 wrote the report after the rest
    assert "2 shard(s): 2 samples ok, 0 skipped (shards done before), 1 failed" in proc.stdout
    assert (out / "report.html").is_file()


def test_torchrun_second_job_into_a_busy_folder_is_refused_on_every_rank(tmp_path, tiny_weights):
    from filelock import FileLock

    random_image(0).save(tmp_path / "a.png")
    out = tmp_path / "out"
    out.mkdir()
    with FileLock(str(out / ".clipviz.lock"), timeout=0):  # the first job, still writing
        proc = torchrun_two(["explain", str(tmp_path / "a.png"), "dog", "-o", str(out),
                             *_model_args(tiny_weights)])  # fmt: skip
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 2, proc.stderr[-3000:]  # one line from each rank
    assert all("another clipviz run is writing" in line for line in errors)
    assert "gloo" not in proc.stderr.lower() and "internal error" not in proc.stderr
