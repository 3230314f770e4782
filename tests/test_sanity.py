"""The model-randomisation sanity check: its two measures against direct computations, the
cascade on a copy (the loaded model never changes), and what it says of methods whose maps
cannot depend on the layers re-drawn."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import random_image
from reference import _batch
from typer.testing import CliRunner

from clipviz.backend.randomize import randomizable_copy, redraw
from clipviz.cli import app
from clipviz.compare import average_ranks, rank_correlation, ssim
from clipviz.runs.sanity import sanity_check

PROMPTS = ["a dog", "a red square", "grass"]

pytestmark = pytest.mark.usefixtures("one_thread")


# -- the measures ----------------------------------------------------------------------


def test_average_ranks_share_ties():
    np.testing.assert_array_equal(
        average_ranks(np.array([3.0, 1.0, 2.0, 2.0, 5.0, 2.0])), [5, 1, 3, 3, 6, 3]
    )


def test_rank_correlation_without_ties_is_spearmans_formula():
    g = np.random.default_rng(0)
    a, b = g.normal(size=50), g.normal(size=50)
    d = np.argsort(np.argsort(a)) - np.argsort(np.argsort(b))
    expected = 1 - 6 * (d**2).sum() / (50 * (50**2 - 1))
    assert rank_correlation(torch.tensor(a), torch.tensor(b)) == pytest.approx(expected)
    assert rank_correlation(torch.tensor(a), torch.tensor(np.exp(a))) == pytest.approx(1.0)
    assert np.isnan(rank_correlation(torch.zeros(5), torch.tensor(a[:5])))


def _ssim_by_windows(x, y, k=11, sigma=1.5):
    """SSIM window by window, from the definition (Wang et al. 2004): Gaussian-weighted
    means, variances and covariance of each k×k window, averaged."""
    ax = np.arange(k) - k // 2
    g = np.exp(-(ax**2) / (2 * sigma**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = 0.01**2, 0.03**2
    values = []
    for i in range(x.shape[0] - k + 1):
        for j in range(x.shape[1] - k + 1):
            px, py = x[i : i + k, j : j + k], y[i : i + k, j : j + k]
            mx, my = (w * px).sum(), (w * py).sum()
            vx, vy = (w * (px - mx) ** 2).sum(), (w * (py - my) ** 2).sum()
            cov = (w * (px - mx) * (py - my)).sum()
            values.append(((2 * mx * my + c1) * (2 * cov + c2))
                          / ((mx**2 + my**2 + c1) * (vx + vy + c2)))  # fmt: skip
    return float(np.mean(values))


def test_ssim_equals_the_windowed_definition():
    g = np.random.default_rng(1)
    x = g.random((24, 20))
    y = np.clip(x + 0.3 * g.normal(size=x.shape), 0, 1)
    assert ssim(torch.tensor(x), torch.tensor(y)) == pytest.approx(_ssim_by_windows(x, y))
    assert ssim(torch.tensor(x), torch.tensor(x)) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(torch.zeros(8, 8), torch.zeros(8, 8))


# -- the cascade -----------------------------------------------------------------------


def test_cascade_redraws_a_copy_from_the_top(vit_backend):
    b = vit_backend
    before = {k: v.clone() for k, v in b.model.state_dict().items()}
    twin, cascade = randomizable_copy(b)
    assert [name for name, _ in cascade] == ["head", "block 1", "block 0"]
    g = torch.Generator().manual_seed(0)
    redraw(cascade[0][1], g)
    redraw(cascade[1][1], g)
    state = twin.model.state_dict()
    changed = {k for k in state if not torch.equal(state[k], before[k])}
    assert "visual.proj" in changed and "visual.ln_post.weight" not in changed  # constant: kept
    assert any(k.startswith("visual.transformer.resblocks.1.") for k in changed)
    assert not any(k.startswith("visual.transformer.resblocks.0.") for k in changed)
    assert not any(k.startswith(("transformer.", "token_embedding")) for k in changed)  # text
    w = state["visual.transformer.resblocks.1.attn.in_proj_weight"]
    w0 = before["visual.transformer.resblocks.1.attn.in_proj_weight"]
    assert float(w.std()) == pytest.approx(float(w0.std()), rel=0.05)
    for k, v in b.model.state_dict().items():  # the loaded model is untouched
        assert torch.equal(v, before[k]), k


def test_sanity_flags_model_independent_maps_and_sees_what_each_method_reads(vit_backend):
    b = vit_backend
    x = _batch(b, 3)
    texts = b.encode_texts(PROMPTS, ensemble=False)
    result = sanity_check(b, x, texts, ["itsm", "rollout", "random"], batch_size=2)
    assert result.stages == ["head", "block 1", "block 0"] and result.pairs == 9
    random, rollout, itsm = (result.methods[m] for m in ("random", "rollout", "itsm"))
    # uniform random maps depend on the pixels only: identical at every step, flagged
    assert random.spearman == pytest.approx([1.0] * 3) and random.flagged
    assert random.ssim == pytest.approx([1.0] * 3)
    # rollout reads attention only: re-drawing the head leaves its maps exactly as they were
    assert rollout.spearman[0] == pytest.approx(1.0) and rollout.spearman[-1] < 0.9
    # ITSM reads the projection: the head's re-draw already changes it
    assert itsm.spearman[0] < 0.9 and not itsm.flagged


# -- the command -----------------------------------------------------------------------


def _model_args(tiny_weights, tower="vit"):
    config, weights = tiny_weights[tower]
    return ["--model-config", str(config), "--pretrained", str(weights)]


def test_sanity_command_writes_table_json_and_plot(tmp_path, tiny_weights):
    d = tmp_path / "photos"
    d.mkdir()
    for i in range(3):
        random_image(seed=30 + i).save(d / f"p{i}.png")
    (d / "bad.jpg").write_text("not an image")
    out = tmp_path / "sanity"
    result = CliRunner().invoke(app, ["sanity", str(d), "a dog", "grass", "-m", "itsm", "-m",
                                      "random", "-o", str(out), *_model_args(tiny_weights)])  # fmt: skip
    assert result.exit_code == 1, result.output  # the unreadable file is reported
    assert "flagged" in result.output and "bad.jpg" in result.output
    data = json.loads((out / "sanity.json").read_text())
    assert data["images"] == 3 and data["stages"] == ["head", "block 1", "block 0"]
    assert data["methods"]["random"]["flagged"] and not data["methods"]["itsm"]["flagged"]
    assert (out / "sanity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sanity_usage_errors(tmp_path, tiny_weights):
    d = tmp_path / "photos"
    d.mkdir()
    random_image(seed=1).save(d / "p.png")
    mine, plot = tmp_path / "mine", tmp_path / "plot"
    (mine / "sanity.json").parent.mkdir()
    (mine / "sanity.json").write_text('{"my": "notes"}')
    plot.mkdir()
    (plot / "sanity.png").write_bytes(b"my picture")
    cases = [
        (["sanity", str(d)], "no prompts given"),
        (["sanity", str(d), "dog", "-f", "voc"], "drop the prompts"),
        (["sanity", str(d), "dog", "-m", "clearclip"], "not defined"),
        (["sanity", str(d), "dog", "--limit", "0"], "at least 1"),
        # results never replace files clipviz did not write
        (["sanity", str(d), "dog", "-o", str(mine)], "is not clipviz results"),
        (["sanity", str(d), "dog", "-o", str(plot)], "sanity.png that clipviz did not write"),
    ]
    for args, message in cases:
        model = _model_args(tiny_weights, "rn" if "clearclip" in args else "vit")
        result = CliRunner().invoke(app, [*args, *model])
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output, result.output
    assert (mine / "sanity.json").read_text() == '{"my": "notes"}'
    assert (plot / "sanity.png").read_bytes() == b"my picture"


def test_sanity_json_prints_the_result_alone_on_stdout(tmp_path, tiny_weights):
    d = tmp_path / "photos"
    d.mkdir()
    random_image(seed=40).save(d / "p.png")
    out = tmp_path / "sanity"
    result = CliRunner().invoke(app, ["sanity", str(d), "a dog", "-m", "random", "-o", str(out),
                                      "--json", *_model_args(tiny_weights)])  # fmt: skip
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)  # the JSON alone: no table, no summary line
    assert data["schema_version"] and data["images"] == 1 and data["failed"] == []
    assert data["out"] == str(out) and data["results"] == str(out / "sanity.json")
    assert data["plot"] == str(out / "sanity.png")
    assert data["methods"]["random"]["flagged"] and data["stages"][-1] == "block 0"
    saved = json.loads((out / "sanity.json").read_text())
    assert {k: v for k, v in data.items() if k not in ("out", "results", "plot")} == saved


def test_sanity_json_writes_undefined_correlations_as_null(tmp_path):
    from clipviz.runs.sanity import CascadeScores, SanityResult, sanity_summary

    nan = float("nan")
    scores = CascadeScores(spearman=[0.5, nan], spearman_std=[0.1, nan], ssim=[0.9, 0.8],
                           ssim_std=[0.0, 0.0], undefined=[0, 4], flagged=False)  # fmt: skip
    result = SanityResult(stages=["head", "block 0"], pairs=4, threshold=0.5,
                          methods={"itsm": scores})  # fmt: skip
    summary = sanity_summary(result, {"model": "tiny"}, {"images": 2})
    text = json.dumps(summary, allow_nan=False)  # strict JSON: no NaN
    back = json.loads(text)["methods"]["itsm"]
    assert back["spearman"] == [0.5, None] and back["spearman_std"] == [0.1, None]
    assert back["undefined"] == [0, 4] and json.loads(text)["model"] == {"model": "tiny"}


def test_cascade_plot_axis_shows_negative_correlations():
    from clipviz.runs.sanity import CascadeScores, SanityResult, lower_limit

    def scores(spearman):
        n = len(spearman)
        return CascadeScores(spearman, [0.0] * n, [0.5] * n, [0.0] * n, [0] * n, False)

    mild = SanityResult(["a", "b"], 4, 0.5, {"itsm": scores([0.9, 0.1])})
    assert lower_limit(mild, "spearman") == -0.2 and lower_limit(mild, "ssim") == 0.0
    steep = SanityResult(["a", "b"], 4, 0.5, {"itsm": scores([0.9, 0.1]),
                                              "surgery": scores([0.2, -0.47])})  # fmt: skip
    assert lower_limit(steep, "spearman") == pytest.approx(-0.52)
