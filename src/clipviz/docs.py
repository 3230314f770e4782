"""The README's generated tables: the supported models (from each architecture's tower, see
`clipviz.backend.support`) and the methods (from the registry: name, towers, summary,
citation, reference code, what the default computes, options with their defaults and ranges).

`python -m clipviz.docs --write` rewrites every generated table in README.md and
docs/models.md; `python -m clipviz.docs` prints them. Tests keep the files equal to this.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from .methods.registry import TOWERS, MethodInfo, Option

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
_TOWER_NAMES = {"vit": "ViT", "rn": "RN", "conv": "conv"}


def towers_text(info: MethodInfo) -> str:
    """The towers a method runs on, in the README's words (`all`, `ViT, RN`, `ViT with a class
    token`)."""
    if set(info.towers) == set(TOWERS):
        return "all"
    vit_needs = set(dict(info.needs).get("vit", ()))
    names = []
    for tower in info.towers:
        name = _TOWER_NAMES[tower]
        if tower == "vit":
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
    """(the README's methods table, its table of what each method computes by default)."""
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


def _between(text: str, start: str, end: str, body: str) -> str:
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{start}\n{body}{end}{tail}"


def with_methods_tables(readme: str, catalog: Mapping[str, MethodInfo] | None = None) -> str:
    """`readme` with its two methods tables generated from the registry's catalogue."""
    from .methods.catalog import catalog as read_catalog

    table, defaults = methods_tables(read_catalog() if catalog is None else catalog)
    readme = _between(readme, METHODS_START, METHODS_END, table)
    return _between(readme, DEFAULTS_START, DEFAULTS_END, defaults)


def main(argv: list[str]) -> None:
    from .backend.support import all_support, rendered, support_tables

    root = Path(__file__).resolve().parents[2]
    rows = all_support()
    if "--write" in argv:
        readme, models = rendered(rows, (root / "README.md").read_text(encoding="utf-8"))
        (root / "README.md").write_text(with_methods_tables(readme), encoding="utf-8")
        (root / "docs" / "models.md").write_text(models, encoding="utf-8")
    else:
        from .methods.catalog import catalog

        print("\n".join([*support_tables(rows), *methods_tables(catalog())]))


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
