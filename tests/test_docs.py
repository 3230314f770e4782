"""The README and the docs stay true to the code: every registered method is in the README's
methods table, and the worked example of docs/adding-a-method.md is the real file and test."""

from __future__ import annotations

import re
from pathlib import Path

from clipviz.docs import methods_tables, with_methods_tables
from clipviz.methods.catalog import catalog

ROOT = Path(__file__).parent.parent


def _blocks(markdown: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", markdown, flags=re.S)


def test_readme_methods_table_lists_every_registered_method():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    table = readme.split("## Methods", 1)[1].split("### Defaults", 1)[0]
    listed = re.findall(r"^\| `([a-z_]+)` \|", table, flags=re.M)
    assert listed == list(catalog())


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
