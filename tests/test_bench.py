"""`clipviz bench` reports each method against the forward pass of the same run."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from clipviz.cli import app
from clipviz.runs.bench import run_bench


def test_bench_rows_are_relative_to_the_forward_pass(vit_backend):
    rows = run_bench(vit_backend, ["itsm"], batch_size=2, n_prompts=2, repeats=2)
    assert [r.name for r in rows] == ["forward (encode_image)", "itsm"]
    forward, itsm = rows
    assert forward.ratio == 1.0
    assert abs(itsm.ratio - itsm.ms_per_image / forward.ms_per_image) < 1e-9


def test_bench_cli_writes_json(tmp_path, tiny_weights):
    config, weights = tiny_weights["rn"]
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(
        app,
        ["bench", "-m", "itsm", "--repeats", "1", "-b", "2", "--json", str(out),
         "--model-config", str(config), "--pretrained", str(weights)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert [r["name"] for r in data["rows"]] == ["forward (encode_image)", "itsm"]
    assert data["batch_size"] == 2 and data["model"]["model"] == "tiny-rn"


def test_bench_lists_a_method_the_tower_cannot_run_instead_of_failing(family_backends):
    # gae runs on ViTs, but needs a class token: a MAP-head tower has none
    rows = run_bench(family_backends("map"), ["itsm", "gae"], batch_size=1, n_prompts=1,
                     repeats=1)  # fmt: skip
    itsm, gae = rows[1:]
    assert itsm.ratio > 0 and not itsm.note
    assert gae.ratio != gae.ratio and gae.note.endswith("n/a")  # NaN
