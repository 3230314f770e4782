"""The README and the docs stay true to the code: the methods page's tables are generated from
the registry, the worked example of docs/adding-a-method.md is the real file and test, and its
sketch of a dense method runs as written; every relative link leads somewhere, the README stays
a landing page, the API page shows every public name, and the docs build reuses the notebook
tests' outputs only where the notebook's code is unchanged."""

from __future__ import annotations

import re
import types
from pathlib import Path

import torch
import torch.nn.functional as F
from conftest import random_image

import clipviz
from clipviz.backend.towers import TOKENS
from clipviz.docs import METHODS_PAGE, README, methods_tables, stage_notebooks, with_methods_tables
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


def test_methods_page_tables_are_generated_from_the_registry():
    page = METHODS_PAGE.read_text(encoding="utf-8")
    assert page == with_methods_tables(page), "run: python -m clipviz.docs --write"


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
    assert info.towers == (TOKENS,) and info.defaults
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


PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]


def _slug(heading: str) -> str:
    """A heading's anchor, as GitHub and MyST (`myst_heading_anchors`) make it."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def _links(markdown: str) -> list[str]:
    """The targets of a page's Markdown links and images, outside code."""
    prose = re.sub(r"```.*?```", "", markdown, flags=re.S)
    prose = re.sub(r"`[^`\n]*`", "", prose)
    return re.findall(r"\]\(([^)\s]+)\)", prose)


def _anchors(markdown: str) -> set[str]:
    prose = re.sub(r"```.*?```", "", markdown, flags=re.S)
    return {_slug(h) for h in re.findall(r"^#{1,6} (.+)$", prose, flags=re.M)}


def test_every_relative_link_in_the_readme_and_the_docs_resolves():
    broken = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for target in _links(text):
            if re.match(r"[a-z]+:", target):  # https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.is_file():
                broken.append(f"{page.name}: {target}")
            elif anchor and anchor not in _anchors(file.read_text(encoding="utf-8")):
                broken.append(f"{page.name}: {target} (no such heading)")
    assert not broken


def test_link_check_sees_a_broken_file_and_a_missing_anchor():
    page = "[a](docs/none.md) `[b](x.md)` [c](#here)\n\n## Here it is\n"
    assert _links(page) == ["docs/none.md", "#here"]
    assert _anchors(page) == {"here-it-is"}
    assert _slug("Which texts does each head write? `clipviz heads`") == (
        "which-texts-does-each-head-write-clipviz-heads"
    )


def test_readme_is_a_landing_page_linking_every_page():
    readme = README.read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 200
    assert "make demo" in readme and "make test" in readme
    linked = {Path(t).name for t in _links(readme) if t.startswith("docs/")}
    pages = {p.name for p in (ROOT / "docs").glob("*.md")} - {"index.md"}
    assert pages <= linked, f"the README links none of {sorted(pages - linked)}"


def test_api_page_documents_every_public_name():
    api = (ROOT / "docs" / "api.md").read_text(encoding="utf-8")
    shown = set(re.findall(r"^\.\. (?:auto\w+|py:data):: clipviz\.(\w+)", api, flags=re.M))
    assert shown == set(clipviz.__all__)


def _notebook(path: Path, code: str) -> None:
    path.write_text(f"# %% [markdown]\n# A title\n\n# %%\n{code}\n", encoding="utf-8")


def test_docs_reuse_executed_notebooks_only_with_the_same_code(tmp_path):
    import jupytext
    import nbformat

    sources, executed, staged = tmp_path / "src", tmp_path / "executed", tmp_path / "staged"
    sources.mkdir()
    executed.mkdir()
    _notebook(sources / "same.py", "1 + 1")
    _notebook(sources / "changed.py", "2 + 2")
    _notebook(sources / "never_run.py", "3 + 3")
    for name, code in (("same", "1 + 1"), ("changed", "2 + 1")):
        nb = jupytext.read(sources / f"{name}.py")
        nb.cells[0].source = "An older title"  # markdown may differ: the current one is shown
        nb.cells[1].source = code
        nb.cells[1].outputs = [nbformat.v4.new_output("execute_result", {"text/plain": "2"})]
        nb.cells[1].execution_count = 1
        nbformat.write(nb, executed / f"{name}.ipynb")
    (staged / "stale.py").parent.mkdir()
    (staged / "stale.py").write_text("")

    assert stage_notebooks(sources, executed, staged) == ["changed", "never_run"]
    assert sorted(p.name for p in staged.iterdir()) == ["changed.py", "never_run.py", "same.ipynb"]
    same = nbformat.read(staged / "same.ipynb", as_version=4)
    assert same.cells[0].source == "A title"
    assert same.cells[1].outputs[0]["data"]["text/plain"] == "2"
    assert (staged / "changed.py").read_text() == (sources / "changed.py").read_text()
