"""The `clipviz` command: a Typer app that registers one module per command.

Each command module holds a plain function (parse, call the library, print); this module
wraps it in the one error handler and registers it. Nothing imported here imports torch or
open_clip, so `clipviz --help` and every `--help` answer at once.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable
from typing import Annotated

import typer

from . import (
    bench,
    concepts,
    evaluate,
    explain,
    heads,
    listings,
    report,
    sanity,
    segment,
    train,
    webapp,
)
from .options import methods_epilog
from .output import handle_errors, out_console

app = typer.Typer(
    name="clipviz",
    help="Where does CLIP look? Saliency maps for CLIP models, and their benchmarks.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=True,
)

_METHOD_COMMANDS = {"explain", "eval", "bench", "sanity"}


def command_help(fn: Callable[..., object]) -> str:
    """A command's docstring as help text: the lines of each paragraph joined, so that the
    terminal wraps them at its own width instead of at the source's line breaks."""
    paragraphs = inspect.cleandoc(fn.__doc__ or "").split("\n\n")
    return "\n\n".join(" ".join(p.split()) for p in paragraphs)


for name, fn in (
    ("explain", explain.explain),
    ("eval", evaluate.evaluate),
    ("coco-object", evaluate.coco_object),
    ("train", train.train),
    ("segment", segment.segment),
    ("concepts", concepts.concepts),
    ("concepts-ood", concepts.concepts_ood),
    ("heads", heads.heads),
    ("sanity", sanity.sanity),
    ("report", report.report),
    ("bench", bench.bench),
    ("methods", listings.methods),
    ("models", listings.models),
    ("app", webapp.serve),
):
    epilog = methods_epilog() if name in _METHOD_COMMANDS else None
    app.command(name, help=command_help(fn), epilog=epilog)(handle_errors(fn))


def _version(value: bool) -> None:
    if value:
        from ..files import package_version

        out_console.print(f"clipviz {package_version('clipviz')}", highlight=False)
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="print the version and exit"
        ),
    ] = False,
) -> None:
    """Where does CLIP look? Saliency maps for CLIP models, and their benchmarks."""


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except SystemExit as e:
        sys.exit(e.code)
