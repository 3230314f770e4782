"""The documentation's generated parts: the supported models (from each architecture's tower,
see `clipviz.backend.support`) in docs/models.md, the methods (from the registry: name,
towers, summary, citation, reference code, what the default computes, options with their
defaults and ranges) in docs/methods.md, and the README's one-paragraph summary of both.

`python -m clipviz.docs --write` rewrites every generated part; `python -m clipviz.docs`
prints the tables. Tests keep the files equal to this.

`stage_notebooks` puts the example notebooks where the Sphinx build reads them, reusing the
outputs of a run of the notebook tests where its code is the notebook's current code.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .methods.registry import TOWERS, MethodInfo, Option
from .tower_kinds import MAP, RESNET, TOKENS

if TYPE_CHECKING:
    from .backend.support import Support

METHODS_START, METHODS_END = "<!-- methods: start -->", "<!-- methods: end -->"
DEFAULTS_START, DEFAULTS_END = "<!-- method defaults: start -->", "<!-- method defaults: end -->"

# what a tower's adapter must offer, as the towers column says it (the strictest need wins)
_VIT_NEEDS = (
    ("linear_head", "ViT with a class token and a linear head"),
    ("class_token", "ViT with a class token"),
    ("readout", "ViT with a class token or a MAP probe"),
    ("eclip", "ViT with a class token or a MAP probe"),
    ("probe", "ViT with a MAP probe"),
)
_TOWER_NAMES = {TOKENS: "ViT", RESNET: "RN", MAP: "conv"}


def towers_text(info: MethodInfo) -> str:
    """The towers a method runs on, in the methods page's words (`all`, `ViT, RN`, `ViT with a
    class token`)."""
    if set(info.towers) == set(TOWERS):
        return "all"
    vit_needs = set(dict(info.needs).get(TOKENS, ()))
    names = []
    for tower in info.towers:
        name = _TOWER_NAMES[tower]
        if tower == TOKENS:
            name = next((text for need, text in _VIT_NEEDS if need in vit_needs), name)
        names.append(name)
    return ", ".join(names)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ") or "—"


def option_text(opt: Option) -> str:
    """`name` = default, its range or choices, and its help: how the defaults table lists an
    option."""
    text = f"`{opt.name}` = `{opt.default!r}`"
    if opt.range is not None:
        text += f" in {opt.range}"
    elif opt.choices:
        text += f" ({' / '.join(f'`{c!r}`' for c in opt.choices)})"
    return f"{text}: {opt.help}" if opt.help else text


def methods_tables(catalog: Mapping[str, MethodInfo]) -> tuple[str, str]:
    """(the methods page's table, its table of what each method computes by default)."""
    table = ["| name | towers | what it computes | reference |", "| --- | --- | --- | --- |"]
    defaults = [
        "| method | reference code | clipviz default | options for the variants |",
        "| --- | --- | --- | --- |",
    ]
    for name, info in catalog.items():
        table.append(
            f"| `{name}` | {towers_text(info)} | {_cell(info.summary)} | {_cell(info.citation)} |"
        )
        options = "<br>".join(option_text(o) for o in info.options)
        defaults.append(
            f"| `{name}` | {_cell(info.reference)} | {_cell(info.defaults)} | {_cell(options)} |"
        )
    return "\n".join(table) + "\n", "\n".join(defaults) + "\n"


ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
MODELS_PAGE = ROOT / "docs" / "models.md"
METHODS_PAGE = ROOT / "docs" / "methods.md"
NOTEBOOKS = ROOT / "examples" / "notebooks"
# where the notebook tests leave each executed notebook, and where the docs build reads them
EXECUTED_NOTEBOOKS = ROOT / "docs" / "_build" / "executed"
STAGED_NOTEBOOKS = ROOT / "docs" / "notebooks"

SUMMARY_START, SUMMARY_END = "<!-- summary: start -->", "<!-- summary: end -->"
FAMILIES_START, FAMILIES_END = "<!-- supported models: start -->", "<!-- supported models: end -->"
MODELS_START, MODELS_END = "<!-- architectures: start -->", "<!-- architectures: end -->"
MODELS_NOTE = """Generated for open_clip {version} by `python -m clipviz.docs --write` from each
architecture's image tower (built on the meta device) and each method's needs;
`tests/test_support.py` checks it is current.

"""


def _between(text: str, start: str, end: str, body: str) -> str:
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{start}\n{body}{end}{tail}"


def with_methods_tables(page: str, catalog: Mapping[str, MethodInfo] | None = None) -> str:
    """`page` (docs/methods.md) with its two methods tables generated from the registry's
    catalogue."""
    from .methods.catalog import catalog as read_catalog

    table, defaults = methods_tables(read_catalog() if catalog is None else catalog)
    page = _between(page, METHODS_START, METHODS_END, table)
    return _between(page, DEFAULTS_START, DEFAULTS_END, defaults)


def with_models_tables(page: str, rows: list[Support]) -> str:
    """`page` (docs/models.md) with its table of tower families and its table of every
    architecture generated from `rows` (`clipviz.backend.support.all_support()`)."""
    from .backend.support import documented_version, support_tables

    families, architectures = support_tables(rows)
    page = _between(page, FAMILIES_START, FAMILIES_END, families)
    note = MODELS_NOTE.format(version=documented_version())
    return _between(page, MODELS_START, MODELS_END, note + architectures)


def summary(rows: list[Support], catalog: Mapping[str, MethodInfo]) -> str:
    """The README's paragraph on what clipviz covers: how many methods, architectures and
    tower families, with links to the pages that list them."""
    runs = [r for r in rows if r.methods]
    families = {r.family for r in runs}
    names = ", ".join(f"`{name}`" for name in catalog)
    return (
        f"**{len(catalog)} methods** ({names}) on **{len(runs)} of open_clip's {len(rows)}"
        f" architectures** in {len(families)} image-tower families, and Hugging Face"
        " `transformers` CLIP and SigLIP checkpoints: see [the methods](docs/methods.md) and"
        " [the models](docs/models.md).\n"
    )


def with_summary(readme: str, rows: list[Support], catalog: Mapping[str, MethodInfo]) -> str:
    """`readme` with its summary paragraph generated from `rows` and `catalog`."""
    return _between(readme, SUMMARY_START, SUMMARY_END, summary(rows, catalog))


def generated(rows: list[Support], pages: Mapping[Path, str]) -> dict[Path, str]:
    """The README, docs/models.md and docs/methods.md (given as `pages`, path → text) with
    every generated part made from `rows` and the registry's catalogue."""
    from .methods.catalog import catalog as read_catalog

    catalog = read_catalog()
    return {
        README: with_summary(pages[README], rows, catalog),
        MODELS_PAGE: with_models_tables(pages[MODELS_PAGE], rows),
        METHODS_PAGE: with_methods_tables(pages[METHODS_PAGE], catalog),
    }


def code_cells(nb: Any) -> list[str]:
    """The sources of a notebook's code cells, in order."""
    return [cell.source for cell in nb.cells if cell.cell_type == "code"]


def stage_notebooks(
    sources: Path = NOTEBOOKS, executed: Path = EXECUTED_NOTEBOOKS, staged: Path = STAGED_NOTEBOOKS
) -> list[str]:
    """Put every notebook of `sources` (jupytext `py:percent` files) into `staged` for the
    docs build: as `<name>.ipynb`, the current cells with the outputs of `executed/<name>.ipynb`,
    where that executed copy has the same code cells; else as the `.py` itself, which the
    build executes. Returns the names left to execute."""
    import shutil

    import jupytext
    import nbformat

    if staged.exists():
        shutil.rmtree(staged)
    staged.mkdir(parents=True)
    to_execute = []
    for source in sorted(sources.glob("*.py")):
        nb = jupytext.read(source)
        done = executed / f"{source.stem}.ipynb"
        ran = nbformat.read(done, as_version=4) if done.is_file() else None
        if ran is not None and code_cells(ran) == code_cells(nb):
            outputs = iter(cell for cell in ran.cells if cell.cell_type == "code")
            for cell in nb.cells:
                if cell.cell_type == "code":
                    run = next(outputs)
                    cell.outputs, cell.execution_count = run.outputs, run.execution_count
            nbformat.write(nb, staged / f"{source.stem}.ipynb")
        else:
            shutil.copyfile(source, staged / source.name)
            to_execute.append(source.stem)
    return to_execute


def main(argv: list[str]) -> None:
    from .backend.support import all_support, support_tables

    rows = all_support()
    if "--write" in argv:
        pages = {
            path: path.read_text(encoding="utf-8") for path in (README, MODELS_PAGE, METHODS_PAGE)
        }
        for path, text in generated(rows, pages).items():
            if text != pages[path]:
                path.write_text(text, encoding="utf-8")
    else:
        from .methods.catalog import catalog

        print("\n".join([*support_tables(rows), *methods_tables(catalog())]))


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
