"""`clipviz segment` over WebDataset shards: labels per sample in the output shard, each
class's share of the pixels in the parquet table, resumed by shard."""

from __future__ import annotations

import json
import tarfile

import numpy as np
import pyarrow.parquet as pq
from conftest import random_image
from PIL import Image
from shard_helpers import png, write_shard
from typer.testing import CliRunner

from clipviz.cli import app
from clipviz.segment import Protocol, Segmenter, inline_classes


def test_shards_get_labels_per_sample_and_shares_per_class(tmp_path, tiny_weights, vit_backend):
    data = tmp_path / "data"
    data.mkdir()
    write_shard(data / "00000.tar", [("a", {"png": png(1), "txt": b"a cat"}),
                                     ("b", {"png": b"not a png"}),
                                     ("c", {"png": png(2, (40, 64))})])  # fmt: skip
    write_shard(data / "00001.tar", [("d", {"png": png(3)})])
    config, weights = tiny_weights["vit"]
    out = tmp_path / "out"
    args = ["segment", str(data / "{00000..00001}.tar"), "--classes", "sky,grass,dog",
            "--short-side", "48", "--window", "32", "--stride", "16", "--out", str(out),
            "--workers", "0", "-b", "2", "-q", "--json", "--model-config", str(config),
            "--pretrained", str(weights), "--device", "cpu"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1, result.output  # sample b failed, the rest done
    payload = json.loads(result.stdout)
    assert (payload["ok"], payload["failed"], payload["skipped"]) == (3, 1, 0)
    run = json.loads((out / "run.json").read_text())
    assert run["kind"] == "segment_shards" and run["classes"] == [["sky"], ["grass"], ["dog"]]
    table = pq.read_table(out / "shards" / "00000.parquet").to_pylist()
    assert [r["key"] for r in table] == ["a", "b", "c"]
    assert [r["status"] for r in table] == ["ok", "failed", "ok"] and table[0]["caption"] == "a cat"
    segmenter = Segmenter(vit_backend, inline_classes("sky,grass,dog"), "sclip",
                          Protocol(short_side=48, window=32, stride=16))  # fmt: skip
    with tarfile.open(out / "shards" / "00000.tar") as tar:
        assert tar.getnames() == ["a.labels.png", "c.labels.png"]
        for row, seed, size in ((table[0], 1, (72, 56)), (table[2], 2, (40, 64))):
            labels = np.asarray(Image.open(tar.extractfile(f"{row['key']}.labels.png")))
            [expected] = segmenter([np.asarray(random_image(seed, size))])
            assert np.array_equal(labels, expected.labels)
            counts = np.bincount(labels.ravel(), minlength=3)
            assert row["shares"] == (counts / counts.sum()).round(6).tolist()
            assert row["classes"] == [c for c in range(3) if counts[c]]
            assert (row["width"], row["height"]) == size
    again = CliRunner().invoke(app, args)
    assert json.loads(again.stdout)["skipped"] == 3  # both shards done: nothing redone
