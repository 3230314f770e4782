"""The README and the docs stay true to the code: the README's methods tables are generated
from the registry, the worked example of docs/adding-a-method.md is the real file and test,
and its sketch of a dense method runs as written."""

from __future__ import annotations

import re
import types
from pathlib import Path

import torch
import torch.nn.functional as F
from conftest import random_image

from clipviz.docs import methods_tables, with_methods_tables
from clipviz.methods import registry
from clipviz.methods.catalog import catalog

ROOT = Path(__file__).parent.parent


def _blocks(markdown: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", markdown, flags=re.S)


def test_adding_a_method_shows_the_real_method_and_its_test():
    doc = (ROOT / "docs" / "adding-a-method.md").read_text(encoding="utf-8")
    blocks = _blocks(doc, "python")
    assert (ROOT / "src" / "clipviz" / "methods" / "rollout.py").read_text() in blocks
    assert (ROOT / "tests" / "test_rollout.py").read_text() in blocks


def test_readme_methods_tables_are_generated_from_the_registry():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert readme == with_methods_tables(readme), "run: python -m clipviz.docs --write"


def test_methods_tables_show_each_methods_towers_defaults_and_option_ranges():
    table, defaults = methods_tables(catalog())
    assert "| `textspan` | ViT with a class token and a linear head |" in table
    assert "| `gradcam` | all |" in table
    assert "| `surgery` | ViT, RN |" in table
    gem = next(line for line in defaults.splitlines() if line.startswith("| `gem` |"))
    assert "`iterations` = `1` in [0, 20]: self-self iterations" in gem
    assert "`temperature` = `None` in (0, 1000]" in gem
    gae = next(line for line in defaults.splitlines() if line.startswith("| `gae` |"))
    assert "`target` = `'logit'` (`'logit'` / `'cosine'`)" in gae


def test_the_guides_sketch_of_a_method_registers_and_computes_kk_attention(vit_backend):
    doc = (ROOT / "docs" / "adding-a-method.md").read_text(encoding="utf-8")
    (sketch,) = [b for b in _blocks(doc, "python") if '"kkattention"' in b]
    module = types.ModuleType("clipviz.methods.kkattention")
    module.__package__ = "clipviz.methods"
    try:
        exec(compile(sketch, "adding-a-method.md", "exec"), module.__dict__)
        info = registry._REGISTRY["kkattention"].info
    finally:
        registry._REGISTRY.pop("kkattention", None)
    assert info.towers == ("vit",) and info.defaults
    b, vit = vit_backend, vit_backend.vit
    images = torch.stack([b.preprocess(random_image(seed=i)) for i in range(2)])
    texts = b.encode_texts(["a dog", "a cat"])
    result = module.kk_attention(b, images, texts)
    with torch.no_grad():  # the sketch's docstring, step by step
        x = vit.run_blocks(vit.embed(images), stop=vit.depth - 1)
        q, k, v = vit.qkv(vit.depth - 1, vit.norm1(vit.depth - 1, x))
        probs = (k @ k.transpose(-2, -1) * k.shape[-1] ** -0.5).softmax(dim=-1)
        tokens = F.normalize(vit.head(vit.attn_out(vit.depth - 1, probs @ v)), dim=-1)[:, 1:]
    expected = (tokens @ texts.embeddings.T).transpose(1, 2).reshape(2, 2, 4, 4)
    torch.testing.assert_close(result.maps, expected, rtol=1e-4, atol=1e-5)
