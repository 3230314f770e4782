"""docs/adding-a-family.md shows the real adapter, tiny tower and config of its worked example,
and the families it names in the tests are the tests' own."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from conftest import FAMILIES

ROOT = Path(__file__).parent.parent
DOC = (ROOT / "docs" / "adding-a-family.md").read_text(encoding="utf-8")


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", DOC, flags=re.S)


def test_adding_a_family_shows_the_real_adapter_tower_and_config():
    python = _blocks("python")
    assert (ROOT / "src" / "clipviz" / "backend" / "timm_registers.py").read_text() in python
    tiny = (ROOT / "tests" / "timm_tiny.py").read_text()
    assert any(b.startswith("@register_model") and b in tiny for b in python)
    assert (ROOT / "tests" / "configs" / "tiny-reg4.json").read_text() in _blocks("json")
    listed = next(b for b in python if b.startswith("FAMILIES = "))
    assert ast.literal_eval(listed.split("=", 1)[1].strip()) == FAMILIES
