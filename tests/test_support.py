"""Every open_clip architecture resolves to a tower adapter or says why not, and docs/models.md's
tables and the README's summary are the ones computed from the code (for the open_clip version
they were generated for; under another version, as `make test-compat` runs, every
architecture must still resolve or say why)."""

from __future__ import annotations

import re

import pytest

from clipviz.backend.support import cached_support, documented_version
from clipviz.docs import MODELS_PAGE as MODELS_PATH
from clipviz.docs import README, with_models_tables, with_summary
from clipviz.methods.catalog import catalog

ATTENTION_METHODS = {"surgery", "maskclip", "clearclip", "sclip", "naclip", "gem", "gradeclip", "gae",
                     "legrad", "textspan", "rollout", "attention"}  # fmt: skip
MODELS_PAGE = MODELS_PATH.read_text(encoding="utf-8")
GENERATED_FOR = re.search(r"Generated for open_clip (\S+)", MODELS_PAGE).group(1)  # type: ignore[union-attr]
CURRENT = documented_version() == GENERATED_FOR
UNSUPPORTED: set[str] = set()


@pytest.fixture(scope="module")
def support():
    # computed from the code once per test session (`clipviz models` below shares it)
    return cached_support()


def test_models_lists_architectures_with_their_tags(support):
    from typer.testing import CliRunner

    from clipviz.cli import app

    result = CliRunner().invoke(app, ["models"])
    assert result.exit_code == 0, result.output
    row = next(line for line in result.output.splitlines() if "│ ViT-B-16 " in line)
    assert "openai" in row and "laion2b_s34b_b88k" in result.output


def test_every_architecture_resolves_or_says_why(support):
    unsupported = {r.model: r.reason for r in support if not r.methods}
    assert set(unsupported) <= UNSUPPORTED and all(unsupported.values())
    full = [r for r in support if {"itsm", "gradcam"} <= set(r.methods)
            and ATTENTION_METHODS & set(r.methods)]  # fmt: skip
    conv = [r for r in support if r.family.startswith("timm ConvNeXt")]  # no attention at all
    assert len(full) == len(support) - len(unsupported) - len(conv)
    if CURRENT:
        assert len(support) == 144 and len(full) >= 133 and set(unsupported) == UNSUPPORTED
        families = {
            r.family for r in support if r.model.startswith(("ViT-B-16-SigLIP2", "PE-Core"))
        }
        assert families == {"timm VisionTransformer, map head", "timm Eva, map head"}
        coca = {r.family for r in support if r.model.startswith("coca_ViT")}
        assert coca == {"open_clip ViT, attentional pool"}


def test_models_page_and_readme_summary_are_generated_from_the_code(support):
    readme = README.read_text(encoding="utf-8")
    expected_models = with_models_tables(MODELS_PAGE, support)
    if CURRENT:
        assert expected_models == MODELS_PAGE, "run: python -m clipviz.docs --write"
        assert readme == with_summary(readme, support, catalog()), (
            "run: python -m clipviz.docs --write"
        )
    else:  # another open_clip: its architectures differ; the tables still render
        assert expected_models.count("\n| `") == len(support)
