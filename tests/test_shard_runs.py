"""Explaining WebDataset shards (one output shard per input shard, resumed by shard) and
splitting runs across torchrun processes: the same outputs as one process."""

from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import random_image, torchrun_two
from shard_helpers import png, write_members, write_shard
from typer.testing import CliRunner

from clipviz.cli import app
from clipviz.explanation import explain
from clipviz.runs import shard_decode
from clipviz.runs import shards as shard_runs
from clipviz.runs.manifest import MANIFEST, latest_records

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_thread")
PROMPTS = ["a red square", "noise"]


def _args(tiny_weights):
    config, weights = tiny_weights["vit"]
    return ["--model-config", str(config), "--pretrained", str(weights), "--device", "cpu",
            "--no-ensemble", "--workers", "0", "-b", "2", "-q"]  # fmt: skip


@pytest.fixture
def shard_set(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    seeds = {}
    for s in range(3):
        samples = []
        for i in range(3):
            key, seed = f"{s:05d}{i:03d}", 10 * s + i
            seeds[key] = seed
            samples.append((key, {"png": png(seed), "txt": f"caption {key}".encode(),
                                  "json": json.dumps({"key": key}).encode()}))  # fmt: skip
        if s == 1:  # a sample that is not an image
            samples.insert(1, ("00001bad", {"jpg": b"not a jpeg", "txt": b"broken"}))
        write_shard(root / f"{s:05d}.tar", samples)
    return root, seeds


def _explain_cli(spec, out, tiny_weights, *extra):
    return runner.invoke(app, ["explain", spec, *PROMPTS, "-o", str(out), "-m", "itsm",
                               *extra, *_args(tiny_weights)])  # fmt: skip


def test_each_shard_becomes_a_tar_of_maps_and_a_parquet_table(shard_set, tmp_path, tiny_weights,
                                                              vit_backend):  # fmt: skip
    root, seeds = shard_set
    out = tmp_path / "out"
    result = _explain_cli(str(root / "{00000..00002}.tar"), out, tiny_weights)
    assert result.exit_code == 1, result.output  # one sample failed
    table = pq.read_table(out / "shards" / "00001.parquet").to_pylist()
    assert [r["key"] for r in table] == ["00001000", "00001bad", "00001001", "00001002"]
    assert [r["status"] for r in table] == ["ok", "failed", "ok", "ok"]
    assert "not an image" in table[1]["error"] and table[1]["caption"] == "broken"
    meta = json.loads(pq.read_schema(out / "shards" / "00001.parquet").metadata[b"clipviz"])
    assert meta["prompts"] == PROMPTS and meta["samples"] == 4 and meta["failed"] == 1
    # the maps and scores are those of explaining the same images directly
    images = [random_image(seeds[r["key"]], (72, 56)) for r in table if r["status"] == "ok"]
    want = explain(vit_backend, images, PROMPTS, "itsm", ensemble=False)
    with tarfile.open(out / "shards" / "00001.tar") as tar:
        names = tar.getnames()
        maps = [np.load(io.BytesIO(tar.extractfile(n).read())) for n in names]
    assert names == ["00001000.maps.npy", "00001001.maps.npy", "00001002.maps.npy"]
    assert all(m.dtype == np.float16 and m.shape == want.maps.shape[1:] for m in maps)
    np.testing.assert_allclose(np.stack(maps), want.maps.numpy(), rtol=1e-3, atol=1e-3)
    ok = [r for r in table if r["status"] == "ok"]
    np.testing.assert_allclose([r["probs"] for r in ok], want.probs.numpy(), rtol=1e-5)
    assert [r["top"] for r in ok] == [PROMPTS[int(i)] for i in want.probs.argmax(1)]
    assert ok[0]["caption"] == "caption 00001000" and ok[0]["width"] == 72
    records = latest_records(out)
    assert len(records) == 3 and {r["samples"] for r in records.values()} == {3, 4}
    # the report of a shard run: counts per shard, prompts' shares, failures with reasons
    assert runner.invoke(app, ["report", str(out)]).exit_code == 0
    page = (out / "report.html").read_text()
    assert "3 shards, 9 samples explained" in page
    assert "<td>00001</td><td>ok</td><td>4</td><td>3</td><td>1</td>" in page
    assert "<td>00001bad</td>" in page and "not an image" in page
    tops = [r["top"] for s in range(3) for r in pq.read_table(
        out / "shards" / f"{s:05d}.parquet").to_pylist() if r["status"] == "ok"]  # fmt: skip
    for prompt in PROMPTS:
        assert f"<tr><td>{prompt}</td><td>{tops.count(prompt)}</td>" in page


def test_a_run_killed_between_shards_resumes_at_the_next_shard(shard_set, tmp_path, tiny_weights,
                                                               monkeypatch):  # fmt: skip
    root, _ = shard_set
    spec = str(root / "*.tar")
    clean = tmp_path / "clean"
    assert _explain_cli(spec, clean, tiny_weights).exit_code == 1
    real, done = shard_runs._explain_shard, []

    def killed_after_one(*args, **kwargs):
        if done:
            raise KeyboardInterrupt  # the run is killed while on its second shard
        done.append(args[1])
        return real(*args, **kwargs)

    monkeypatch.setattr(shard_runs, "_explain_shard", killed_after_one)
    out = tmp_path / "out"
    _explain_cli(spec, out, tiny_weights)
    assert sorted(p.name for p in (out / "shards").iterdir()) == ["00000.parquet", "00000.tar"]
    first = (out / "shards" / "00000.tar").stat().st_mtime_ns
    monkeypatch.setattr(shard_runs, "_explain_shard", real)
    assert _explain_cli(spec, out, tiny_weights).exit_code == 1
    statuses = {os.path.basename(r["input"]): r["status"] for r in latest_records(out).values()}
    assert statuses == {"00000.tar": "skipped", "00001.tar": "ok", "00002.tar": "ok"}
    assert (out / "shards" / "00000.tar").stat().st_mtime_ns == first
    for name in ("00000", "00001", "00002"):
        assert (out / "shards" / f"{name}.tar").read_bytes() == (
            clean / "shards" / f"{name}.tar"
        ).read_bytes()
        assert pq.read_table(out / "shards" / f"{name}.parquet").equals(
            pq.read_table(clean / "shards" / f"{name}.parquet")
        )


def test_a_batch_the_model_fails_on_and_an_unreadable_shard_fail_alone_and_resume_apart(
    shard_set, tmp_path, tiny_weights, monkeypatch
):
    root, _ = shard_set
    (root / "00003.tar").write_bytes(b"not a tar")
    real, calls = shard_runs.explain, []

    def fails_first(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("out of memory")
        return real(*args, **kwargs)

    monkeypatch.setattr(shard_runs, "explain", fails_first)
    out = tmp_path / "out"
    assert _explain_cli(str(root / "*.tar"), out, tiny_weights).exit_code == 1
    rows = pq.read_table(out / "shards" / "00000.parquet").to_pylist()
    assert [(r["key"], r["status"], r["error"]) for r in rows] == [
        ("00000000", "failed", "model failed: RuntimeError: out of memory"),
        ("00000001", "failed", "model failed: RuntimeError: out of memory"),
        ("00000002", "ok", None),
    ]  # fmt: skip
    assert not list((out / "shards").glob("00003.*"))  # nothing kept: the next run retries
    result = _explain_cli(str(root / "*.tar"), out, tiny_weights, "--json")
    assert result.exit_code == 1
    summary = json.loads(result.stdout)
    records = {os.path.basename(r["input"]): r for r in summary["records"]}
    assert {name: r["status"] for name, r in records.items()} == {
        "00000.tar": "skipped", "00001.tar": "skipped", "00002.tar": "skipped",
        "00003.tar": "failed",
    }  # fmt: skip
    assert records["00003.tar"]["error"].startswith("shard cannot be read")
    # failed: the two samples of the failed batch, 00001bad and the unreadable shard
    assert (summary["ok"], summary["skipped"], summary["failed"]) == (0, 7, 4)


def test_a_missing_shard_is_refused_before_any_work(shard_set, tmp_path, tiny_weights):
    root, _ = shard_set
    result = _explain_cli(str(root / "{00000..00004}.tar"), tmp_path / "out", tiny_weights)
    assert result.exit_code == 2 and "2 of 5 shards do not exist" in result.output
    assert not (tmp_path / "out").exists()


def test_maps_npz_in_float16_when_asked(tmp_path, tiny_weights):
    random_image(0).save(tmp_path / "a.png")
    for dtype in ("float16", "float32"):
        out = tmp_path / dtype
        assert _explain_cli(str(tmp_path / "a.png"), out, tiny_weights, "--maps-dtype",
                            dtype).exit_code == 0  # fmt: skip
        with np.load(out / "a.png" / "maps.npz") as npz:
            assert npz["maps"].dtype == np.dtype(dtype)
    with (
        np.load(tmp_path / "float16" / "a.png" / "maps.npz") as a,
        np.load(tmp_path / "float32" / "a.png" / "maps.npz") as b,
    ):
        np.testing.assert_allclose(a["maps"], b["maps"], rtol=1e-3, atol=1e-4)
    bad = _explain_cli(
        str(tmp_path / "a.png"), tmp_path / "x", tiny_weights, "--maps-dtype", "int8"
    )
    assert bad.exit_code == 2 and "float32, float16" in bad.output


def test_two_torchrun_processes_explain_what_one_does(shard_set, tmp_path, tiny_weights):
    root, _ = shard_set
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(5):
        random_image(i).save(folder / f"{i}.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    for spec, name in ((str(root / "*.tar"), "shards"), (str(folder), "images")):
        args = ["explain", spec, *PROMPTS, "-m", "itsm", *_args(tiny_weights)]
        proc = torchrun_two([*args, "-o", str(tmp_path / f"{name}-2")])
        assert proc.returncode == 1, proc.stderr[-3000:]  # a sample fails in both
        assert runner.invoke(app, [*args, "-o", str(tmp_path / f"{name}-1")]).exit_code == 1
        two, one = tmp_path / f"{name}-2", tmp_path / f"{name}-1"
        assert not list(two.glob("manifest.rank*"))  # merged into the manifest
        recs = [latest_records(d) for d in (two, one)]
        assert recs[0].keys() == recs[1].keys()  # every input once, none lost
        lines = (two / MANIFEST).read_text().splitlines()
        assert len(lines) == len(recs[0])  # none done twice
        for k in recs[1]:
            assert recs[0][k]["status"] == recs[1][k]["status"]
            if "probs" in recs[1][k]:
                assert recs[0][k]["probs"] == pytest.approx(recs[1][k]["probs"], rel=1e-5)
        files = sorted(p.relative_to(one) for p in one.rglob("*") if p.is_file()
                       and p.suffix in (".tar", ".npz", ".png"))  # fmt: skip
        assert files
        for rel in files:
            if rel.suffix == ".npz":
                with np.load(one / rel) as a, np.load(two / rel) as b:
                    assert a.files == b.files
                    for k in a.files:
                        if a[k].dtype.kind == "f":
                            np.testing.assert_allclose(a[k], b[k], rtol=1e-4, atol=1e-5)
            elif rel.suffix == ".tar":
                with tarfile.open(one / rel) as a, tarfile.open(two / rel) as b:
                    assert a.getnames() == b.getnames()
                    for n in a.getnames():
                        x = np.load(io.BytesIO(a.extractfile(n).read()))
                        y = np.load(io.BytesIO(b.extractfile(n).read()))
                        torch.testing.assert_close(torch.from_numpy(x), torch.from_numpy(y),
                                                   rtol=1e-3, atol=1e-3)  # fmt: skip
            else:
                assert (two / rel).is_file()


def test_decoding_processes_give_the_outputs_of_decoding_in_line(shard_set, tmp_path,
                                                                  tiny_weights):  # fmt: skip
    root, _ = shard_set
    outs = {}
    for workers in ("0", "2"):
        out = outs[workers] = tmp_path / f"out-{workers}"
        args = [a if a != "0" else workers for a in _args(tiny_weights)]  # --workers N
        result = runner.invoke(app, ["explain", str(root / "*.tar"), *PROMPTS, "-o", str(out),
                                     "-m", "itsm", *args])  # fmt: skip
        assert result.exit_code == 1, result.output  # 00001bad
    for s in range(3):
        tars = [(outs[w] / "shards" / f"{s:05d}.tar").read_bytes() for w in ("0", "2")]
        assert tars[0] == tars[1]
        rows = [pq.read_table(outs[w] / "shards" / f"{s:05d}.parquet").to_pylist()
                for w in ("0", "2")]  # fmt: skip
        assert rows[0] == rows[1]


def _dies_on_sample_one_of_shard_two(index, sample):
    if index == 1 and sample.key.startswith("00002"):
        os._exit(1)  # a decoding process that crashes (as an image library may)
    return REAL_DECODE(index, sample)


REAL_DECODE = shard_decode._decode_in_worker


def test_a_decoding_process_that_dies_fails_its_shard_whole_and_it_is_redone(
    shard_set, tmp_path, tiny_weights, monkeypatch
):
    root, _ = shard_set
    monkeypatch.setattr(shard_decode, "_decode_in_worker", _dies_on_sample_one_of_shard_two)
    out = tmp_path / "out"
    args = [a if a != "0" else "2" for a in _args(tiny_weights)]  # two decoding processes
    explain_args = ["explain", str(root / "*.tar"), *PROMPTS, "-o", str(out), "-m", "itsm"]
    result = runner.invoke(app, [*explain_args, *args])
    assert result.exit_code == 1
    records = latest_records(out)
    rec = next(r for r in records.values() if r["input"].endswith("00002.tar"))
    assert rec["status"] == "failed" and "a decoding process died" in rec["error"]
    assert not (out / "shards" / "00002.tar").exists()
    assert not (out / "shards" / "00002.parquet").exists()
    assert all(r["status"] == "ok" for r in records.values() if r is not rec)
    monkeypatch.setattr(shard_decode, "_decode_in_worker", REAL_DECODE)
    assert runner.invoke(app, [*explain_args, *args]).exit_code == 1  # 00001bad
    assert len(pq.read_table(out / "shards" / "00002.parquet")) == 3


def test_stdin_lists_are_refused_under_torchrun(tmp_path, tiny_weights, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    result = runner.invoke(app, ["explain", "--inputs-file", "-", "dog", "-o", str(tmp_path)],
                           input="a.jpg\n")  # fmt: skip
    assert result.exit_code == 2 and "cannot be read by several torchrun" in result.output


def test_the_reader_thread_hands_on_in_order_then_the_error_it_met():
    def source():
        yield from range(5)
        raise tarfile.ReadError("unexpected end of data")

    it = shard_decode.read_ahead(source(), depth=2)
    assert [next(it) for _ in range(5)] == [0, 1, 2, 3, 4]
    with pytest.raises(tarfile.ReadError, match="unexpected end"):
        next(it)


def test_the_reader_thread_stays_a_few_samples_ahead_and_stops_when_closed():
    import threading
    import time

    produced, closed = [], threading.Event()

    def source():
        try:
            for i in range(1000):
                produced.append(i)
                yield i
        finally:
            closed.set()

    it = shard_decode.read_ahead(source(), depth=3)
    assert next(it) == 0
    time.sleep(0.3)  # time enough for the reader to run ahead as far as it may
    assert 1 + 3 <= len(produced) <= 1 + 3 + 1  # the queue full, one more in its hand
    it.close()
    assert closed.wait(5) and not any(
        t.name == "clipviz-shard-reader" for t in threading.enumerate()
    )


# -- hostile shards: every member accounted for, nothing read unbounded, outputs complete -----


def _table_and_members(out, name="00000"):
    rows = pq.read_table(out / "shards" / f"{name}.parquet").to_pylist()
    with tarfile.open(out / "shards" / f"{name}.tar") as tar:
        maps = {m.name: np.load(io.BytesIO(tar.extractfile(m).read())) for m in tar}
    return rows, maps


def test_a_key_met_again_later_in_the_shard_is_a_failed_row_and_keeps_the_first_maps(
    tmp_path, tiny_weights, vit_backend
):
    shard = write_members(tmp_path / "00000.tar", [
        ("1.png", png(1)), ("1.txt", b"first"), ("2.png", png(2)),
        ("1.png", png(3)), ("1.txt", b"again"),
    ])  # fmt: skip
    out = tmp_path / "out"
    assert _explain_cli(str(shard), out, tiny_weights).exit_code == 1
    rows, maps = _table_and_members(out)
    assert [(r["key"], r["status"], r["caption"]) for r in rows] == [
        ("1", "ok", "first"), ("2", "ok", None), ("1", "failed", "again")
    ]  # fmt: skip
    assert rows[2]["error"] == "key appears twice in the shard; only its first sample is explained"
    assert list(maps) == ["1.maps.npy", "2.maps.npy"]
    first, other = (random_image(s, (72, 56)) for s in (1, 2))
    want = explain(vit_backend, [first, other], PROMPTS, "itsm", ensemble=False).maps.numpy()
    np.testing.assert_allclose(maps["1.maps.npy"], want[0], rtol=1e-3, atol=1e-3)


def test_link_members_are_failed_rows_not_read(tmp_path, tiny_weights):
    shard = write_members(tmp_path / "00000.tar", [
        ("0.png", png(0)), ("1.png", tarfile.SYMTYPE, "/etc/passwd"), ("1.txt", b"one"),
        ("2.png", tarfile.LNKTYPE, "0.png"), ("3.png", png(3)),
    ])  # fmt: skip
    out = tmp_path / "out"
    assert _explain_cli(str(shard), out, tiny_weights).exit_code == 1
    rows, maps = _table_and_members(out)
    assert [(r["key"], r["status"], r["error"]) for r in rows] == [
        ("0", "ok", None),
        ("1", "failed", "member 1.png is a link; not read"),
        ("2", "failed", "member 2.png is a link; not read"),
        ("3", "ok", None),
    ]
    assert rows[1]["caption"] == "one" and list(maps) == ["0.maps.npy", "3.maps.npy"]


def test_members_named_outside_the_shard_are_failed_rows_and_the_run_goes_on(tmp_path,
                                                                             tiny_weights):  # fmt: skip
    root = tmp_path / "data"
    root.mkdir()
    write_members(root / "00000.tar", [
        ("0.png", png(0)), ("../../x.jpg", png(1)), ("../../x.txt", b"up"),
        ("/abs.jpg", png(2)), ("a/../../b.png", png(3)), ("4.png", png(4)),
    ])  # fmt: skip
    write_members(root / "00001.tar", [("5.png", png(5))])
    out = tmp_path / "out"
    for _ in range(2):  # the second run skips both shards: they are done
        result = _explain_cli(str(root / "*.tar"), out, tiny_weights)
        assert result.exit_code == 1, result.output
    rows, maps = _table_and_members(out)
    escape = "its name is absolute or holds '..'; not read"
    assert [(r["key"], r["status"], r["error"]) for r in rows] == [
        ("0", "ok", None),
        ("../../x", "failed", f"member ../../x.jpg: {escape}; member ../../x.txt: {escape}"),
        ("/abs", "failed", f"member /abs.jpg: {escape}"),
        ("a/../../b", "failed", f"member a/../../b.png: {escape}"),
        ("4", "ok", None),
    ]
    assert list(maps) == ["0.maps.npy", "4.maps.npy"]
    assert sorted(r["status"] for r in latest_records(out).values()) == ["skipped", "skipped"]
    assert _table_and_members(out, "00001")[0][0]["status"] == "ok"


def test_undecodable_member_names_become_escaped_keys_alike_in_tar_and_table(tmp_path,
                                                                             tiny_weights):  # fmt: skip
    from urllib.parse import unquote_to_bytes

    shard = write_members(tmp_path / "00000.tar", [
        ("caf\udce9.png", png(0)), ("caf\udce9.txt", b"latin-1 name"), ("50%.png", png(1)),
        ("caf\u00e9.png", png(2)), ("7.t\udcffxt", b"no image"),
    ])  # fmt: skip
    out = tmp_path / "out"
    result = _explain_cli(str(shard), out, tiny_weights)
    assert result.exit_code == 1, result.output  # sample 7 has no image
    rows, maps = _table_and_members(out)
    assert [(r["key"], r["status"]) for r in rows] == [
        ("caf%E9", "ok"), ("50%25", "ok"), ("caf\u00e9", "ok"), ("7", "failed")
    ]  # fmt: skip
    assert rows[0]["caption"] == "latin-1 name"
    assert rows[3]["error"] == "no image in this sample (members: t%FFxt)"
    assert list(maps) == [f"{r['key']}.maps.npy" for r in rows[:3]]
    assert [unquote_to_bytes(r["key"]) for r in rows] == [
        b"caf\xe9", b"50%", "caf\u00e9".encode(), b"7"
    ]  # fmt: skip


def test_members_above_their_size_cap_fail_unread_and_long_captions_are_cut(tmp_path,
                                                                           tiny_weights):  # fmt: skip
    from clipviz.data import shards as shard_data

    over = shard_data.SIDECAR_MAX_BYTES + 200_000
    big_image = b"\xff\xd8" + bytes(1 << 21)  # 2 MB, not read: no "not an image" for it
    shard = write_members(tmp_path / "00000.tar", [
        ("0.png", png(0)), ("0.txt", b"w" * over),
        ("1.png", png(1)), ("1.json", b"[" * over), ("1.txt", b"one"),
        ("2.jpg", big_image), ("2.txt", b"two"),
        ("3.png", png(3)), ("3.txt", "\u00fc".encode() * 50_000), ("3.mp4", b"v" * over),
    ])  # fmt: skip
    out = tmp_path / "out"
    # 4,032 pixels per image here: 4,100 allow them, and cap an image member near 1 MB
    result = _explain_cli(str(shard), out, tiny_weights, "--max-pixels", "4100")
    assert result.exit_code == 1, result.output
    rows, maps = _table_and_members(out)
    assert [(r["key"], r["status"]) for r in rows] == [
        ("0", "failed"), ("1", "failed"), ("2", "failed"), ("3", "ok")
    ]  # fmt: skip
    sidecar = "4.2 MB, above the 4.0 MB a .txt or .json may be; not read"
    assert rows[0]["error"] == f"member 0.txt is {sidecar}" and rows[0]["caption"] is None
    assert rows[1]["error"] == f"member 1.json is {sidecar}" and rows[1]["caption"] == "one"
    assert rows[2]["error"] == (
        "member 2.jpg is 2.1 MB, above the 1.1 MB an image may be with `max_pixels` 4100; "
        "not read (raise `max_pixels`)"
    )
    assert rows[2]["caption"] == "two" and list(maps) == ["3.maps.npy"]
    caption = rows[3]["caption"]  # cut; the unused .mp4 beside it is not read, whatever its size
    assert len(caption) == shard_data.CAPTION_MAX_CHARS
    assert caption == "\u00fc" * (len(caption) - 1) + "\u2026"
