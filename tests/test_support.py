"""Every open_clip architecture resolves to a tower adapter or says why not, and the README's
and docs/models.md's tables are the ones computed from the code."""

from __future__ import annotations

from pathlib import Path

import pytest

from clipviz.backend.support import all_support, rendered

ROOT = Path(__file__).parent.parent
ATTENTION_METHODS = {"surgery", "maskclip", "clearclip", "gae", "legrad", "rollout", "attention"}


@pytest.fixture(scope="module")
def support():
    return all_support()


def test_every_architecture_resolves_or_says_why(support):
    assert len(support) == 144  # open_clip 3.x's registry
    unsupported = {r.model: r.reason for r in support if not r.methods}
    assert set(unsupported) == {"coca_ViT-B-32", "coca_ViT-L-14",
                                "vit_relpos_medium_patch16_cls_224"}  # fmt: skip
    assert all(unsupported.values())
    full = [r for r in support if {"itsm", "gradcam"} <= set(r.methods)
            and ATTENTION_METHODS & set(r.methods)]  # fmt: skip
    assert len(full) >= 123
    families = {r.family for r in support if r.model.startswith(("ViT-B-16-SigLIP2", "PE-Core"))}
    assert families == {"timm VisionTransformer, map head", "timm Eva, map head"}


def test_readme_and_models_page_are_generated_from_the_code(support):
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    expected_readme, expected_models = rendered(support, readme)
    assert readme == expected_readme, "run: python -m clipviz.backend.support --write"
    assert (ROOT / "docs" / "models.md").read_text(encoding="utf-8") == expected_models
