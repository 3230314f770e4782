"""Every numeric method option declares the finite range it allows, checked once when options
are bound (from `-O` and from the library's `explain()`), over the whole registry: an option
added without a range fails here."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import random_image
from typer.testing import CliRunner

import clipviz
from clipviz import ClipvizError
from clipviz.cli import app
from clipviz.methods import get_method, method_options, methods
from clipviz.methods.registry import Range, signature_options

REGISTRY = methods()
runner = CliRunner()


def _numeric(option):
    kinds = {m.strip() for m in option.type.split("|")}
    return bool(kinds & {"int", "float"})


NUMERIC = [(name, o) for name, m in REGISTRY.items() for o in m.options if _numeric(o)]


def test_the_registry_has_numeric_options_to_check():
    names = {f"{m}.{o.name}" for m, o in NUMERIC}
    assert {"gem.temperature", "gem.iterations", "naclip.std", "gscorecam.topk"} <= names


@pytest.mark.parametrize("method,option", NUMERIC, ids=[f"{m}.{o.name}" for m, o in NUMERIC])
def test_every_numeric_option_has_a_finite_range_holding_its_default(method, option):
    assert option.range is not None, f"{method}.{option.name} declares no range"
    assert math.isfinite(option.range.low) and math.isfinite(option.range.high)
    assert option.range.low < option.range.high
    assert option.default is None or option.default in option.range


def _outside(option):
    """Values just outside the option's range, from the library and as `-O` text."""
    r = option.range
    step = 1 if "int" in option.type else 1e-3
    low = r.low if r.low_open else r.low - step
    high = r.high if r.high_open else r.high + step
    values = [low, high]
    if "float" in option.type:
        values += [math.nan, math.inf, -math.inf]
    return values


@pytest.mark.parametrize("method,option", NUMERIC, ids=[f"{m}.{o.name}" for m, o in NUMERIC])
def test_values_outside_an_options_range_are_usage_errors_naming_it(method, option):
    info = REGISTRY[method].info
    for value in _outside(option):
        for given, from_text in ((value, False), (str(value), True)):
            with pytest.raises(ClipvizError) as e:
                info.bind({option.name: given}, from_text)
            text = str(e.value)
            assert e.value.exit_code == 2 and "\n" not in text
            assert f"method {method}: option {option.name}={value}" in text, text
            assert f"is outside {option.range}" in text, text
    r = option.range
    kind = int if "int" in option.type else float
    for edge, is_open in ((r.low, r.low_open), (r.high, r.high_open)):
        if not is_open:  # the closed ends themselves are allowed
            assert info.bind({option.name: kind(edge)}) == {option.name: kind(edge)}


@pytest.mark.parametrize(
    "raw,message",
    [
        ("temperature=nan", "option temperature=nan is outside (0, 1000]"),
        ("temperature=inf", "option temperature=inf is outside (0, 1000]"),
        ("temperature=-1", "option temperature=-1.0 is outside (0, 1000]"),
        ("iterations=1000000000", "option iterations=1000000000 is outside [0, 20]"),
    ],
)
def test_gem_refuses_a_temperature_that_is_not_finite_and_positive_and_endless_iterations(
    raw, message
):
    with pytest.raises(ClipvizError, match=message.replace("(", r"\(").replace("[", r"\[")):
        method_options(["gem"], [raw])


def test_the_cli_refuses_an_out_of_range_option_in_one_line_with_exit_2(tmp_path, tiny_weights):
    config, weights = tiny_weights["vit"]
    random_image(0).save(tmp_path / "a.png")
    result = runner.invoke(app, ["explain", str(tmp_path / "a.png"), "a dog", "-m", "gem",
                                 "-O", "temperature=nan", "-o", str(tmp_path / "o"),
                                 "--model-config", str(config), "--pretrained", str(weights)])  # fmt: skip
    assert result.exit_code == 2, result.output
    assert "method gem: option temperature=nan is outside (0, 1000]" in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert not (tmp_path / "o" / "a.png").exists()


def test_the_library_refuses_an_out_of_range_option_before_any_work(vit_backend, monkeypatch):
    image = torch.zeros(1, 3, 32, 32)
    monkeypatch.setattr(vit_backend, "encode_texts", lambda *a, **k: pytest.fail("ran"))
    with pytest.raises(ClipvizError, match=r"option std=0.0 is outside \[0.1, 1000\]"):
        clipviz.explain(vit_backend, image, ["a dog"], "naclip", options={"std": 0.0})


def test_an_integer_too_large_for_a_float_is_out_of_range_not_a_crash():
    with pytest.raises(ClipvizError, match="option std=inf is outside"):
        get_method("naclip").info.bind({"std": 10**400})


def test_ranges_are_written_as_intervals_and_read_exactly():
    r = Range.parse("(0, 1000]")
    assert (r.low, r.high, r.low_open, r.high_open) == (0, 1000, True, False)
    assert str(r) == "(0, 1000]" and str(Range.parse("[-256,255]")) == "[-256, 255]"
    assert 1000 in r and 0 not in r and 1e-9 in r and math.nan not in r
    for bad in ("0..10", "[5, 1]", "[0, inf]", "(0, 1"):
        with pytest.raises(ValueError):
            Range.parse(bad)


def test_a_range_for_an_option_that_is_not_there_or_not_numeric_or_missing_its_default():
    def method(backend, images, texts, k: int = 3, name: str = "a", p: float | None = None):
        """k: a count.
        name: a name.
        p: a level."""

    assert signature_options(method, {"k": "[1, 8]"})[0].range == Range.parse("[1, 8]")
    with pytest.raises(TypeError, match="no option 'kk'"):
        signature_options(method, {"kk": "[1, 8]"})
    with pytest.raises(TypeError, match="name is not numeric"):
        signature_options(method, {"name": "[1, 8]"})
    with pytest.raises(TypeError, match="default 3 is outside"):
        signature_options(method, {"k": "[4, 8]"})
