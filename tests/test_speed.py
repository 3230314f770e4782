"""The speed options change how the image tower runs, not what it computes: channels-last
convolutions and compiled blocks give the maps of the plain tower for every method."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import random_image
from typer.testing import CliRunner

from clipviz import ClipvizError
from clipviz.backend import load_backend, speed
from clipviz.cli import app
from clipviz.explanation import explain
from clipviz.methods import methods

PROMPTS = ["a dog", "a square"]
# every kind of unit: ViT blocks (open_clip, timm, EVA, relative positions), bottlenecks,
# timm stages (ConvNeXt). FastViT's stages are compiled as ConvNeXt's are; tracing them alone
# took 55 s of the suite, so they are left out here
COMPILED_FAMILIES = ("vit", "rn", "map", "eva", "convnext", "relpos")
# a forward-only method, one with explicit attention, and gradients through one block or many
COMPILED_METHODS = ("itsm", "surgery", "gradcam", "legrad", "gae", "gscorecam")
NEEDS_INPUT = {"eclip", "convis", "random", "proxyclip", "cass"}  # an input of their own, or none
pytestmark = pytest.mark.usefixtures("one_thread")


def _fresh(tiny_weights, family, **speed_options):
    config, weights = tiny_weights[family]
    return load_backend(model_config=config, pretrained=str(weights), device="cpu", **speed_options)


def _batch(backend, n=2):
    return torch.stack([backend.preprocess(random_image(seed=30 + i)) for i in range(n)])


def _runnable(backend):
    return [
        name
        for name, m in methods().items()
        if name not in NEEDS_INPUT and m.info.fits(backend.tower, backend.vision.capabilities)
    ]


def _options(name):
    return {"topk": 4} if name == "gscorecam" else None


@pytest.mark.parametrize("family", ["rn", "convnext", "fastvit"])
def test_channels_last_towers_give_the_maps_of_contiguous_ones(tiny_weights, family):
    plain = _fresh(tiny_weights, family)
    fast = _fresh(tiny_weights, family, channels_last=True)
    assert fast.speed["channels_last"] and not plain.speed["channels_last"]
    convs = [m for m in fast.model.visual.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    x = _batch(plain)
    names = _runnable(plain)
    assert "gradcam" in names and "itsm" in names
    for name in names:
        a = explain(plain, x, PROMPTS, name, options=_options(name))
        b = explain(fast, x, PROMPTS, name, options=_options(name))
        # channels-last convolutions round differently: equal to 1e-4 of each map's own scale
        # (Grad-CAM's raw maps are ~1e-7; LeGrad's are min-max normalised, differing by ~6e-5)
        scale = float(a.maps.abs().max())
        torch.testing.assert_close(b.maps, a.maps, rtol=1e-4, atol=1e-4 * scale, msg=name)
        torch.testing.assert_close(b.scores, a.scores, rtol=1e-4, atol=1e-5, msg=name)


def test_channels_last_is_chosen_for_convolutional_towers_on_cuda_only(tiny_weights):
    vit, rn = _fresh(tiny_weights, "vit"), _fresh(tiny_weights, "rn")
    assert not speed.is_convolutional(vit.model.visual)  # its one convolution: the patches
    assert speed.is_convolutional(rn.model.visual)
    assert rn.speed == {"channels_last": False, "compiled_units": 0}  # CPU: off by default


@pytest.fixture
def graph_compiler(monkeypatch):
    """torch.compile through its graph capture and autograd, without code generation: the
    same tracing of the blocks as inductor, in seconds instead of minutes on a CPU."""
    monkeypatch.setattr(speed, "COMPILE_BACKEND", "aot_eager")
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("family", COMPILED_FAMILIES)
def test_compiled_blocks_give_the_eager_maps(tiny_weights, graph_compiler, family, caplog):
    plain = _fresh(tiny_weights, family)
    fast = _fresh(tiny_weights, family, compile=True)
    units = speed.repeated_units(fast.model.visual)
    assert fast.speed["compiled_units"] == len(units) > 0
    assert all(u._compiled_call_impl is not None for u in units)
    # weights keep their names (a checkpoint of the model still loads)
    assert fast.model.state_dict().keys() == plain.model.state_dict().keys()
    x = _batch(plain, 3)
    with caplog.at_level("WARNING", logger="torch._dynamo"):
        names = [m for m in _runnable(plain) if m in COMPILED_METHODS]
        assert "itsm" in names and "gradcam" in names
        for name in names:  # two prompts: gradients go back through a graph twice
            a = explain(plain, x, PROMPTS, name, options=_options(name))
            b = explain(fast, x, PROMPTS, name, options=_options(name))
            torch.testing.assert_close(b.maps, a.maps, rtol=1e-4, atol=1e-5, msg=name)
    # no unit fell back to running uncompiled (torch says so in a warning when it does)
    assert not [r for r in caplog.records if "recompile" in r.getMessage()]


def test_the_units_compiled_are_the_blocks_and_stages(tiny_weights):
    vit, rn = _fresh(tiny_weights, "vit"), _fresh(tiny_weights, "rn")
    assert speed.repeated_units(vit.model.visual) == list(vit.model.visual.transformer.resblocks)
    bottlenecks = [b for i in range(1, 5) for b in getattr(rn.model.visual, f"layer{i}")]
    assert speed.repeated_units(rn.model.visual) == bottlenecks
    convnext = _fresh(tiny_weights, "convnext").model.visual
    # its stages, not the stem (a convolution and a norm) nor the head (dropout, linear)
    assert speed.repeated_units(convnext) == list(convnext.trunk.stages)


def test_a_compiler_that_fails_is_one_line_at_load_time(tiny_weights, monkeypatch):
    def no_compiler(graph, inputs):
        raise RuntimeError("no C++ compiler found\nmore details")

    monkeypatch.setattr(speed, "COMPILE_BACKEND", no_compiler)
    try:
        with pytest.raises(ClipvizError, match="`compile` failed.*run without --compile") as e:
            _fresh(tiny_weights, "vit", compile=True)
        assert "\n" not in str(e.value)
    finally:
        torch._dynamo.reset()


def test_explain_records_the_speed_options_in_run_json(tiny_weights, tmp_path, graph_compiler):
    config, weights = tiny_weights["rn"]
    image = tmp_path / "a.png"
    random_image(seed=3).save(image)
    out = tmp_path / "out"
    args = ["explain", str(image), "dog", "--model-config", str(config), "--pretrained",
            str(weights), "--device", "cpu", "--out", str(out), "--workers", "0", "--quiet"]  # fmt: skip
    r = CliRunner().invoke(app, [*args, "--compile", "--channels-last"])
    assert r.exit_code == 0, r.output
    run = json.loads((out / "run.json").read_text())
    units = len(speed.repeated_units(_fresh(tiny_weights, "rn").model.visual))
    assert run["speed"] == {"channels_last": True, "compiled_units": units}
