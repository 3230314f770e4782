"""`clipviz report RUN_DIR`: one static HTML page over a run's outputs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .options import DebugOpt
from .output import out_console


def report(
    run_dir: Annotated[
        Path,
        typer.Argument(help="the --out folder of a clipviz explain run", show_default=False),
    ],
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="(default: RUN_DIR/report.html)", show_default=False),
    ] = None,
    debug: DebugOpt = False,
) -> None:
    """One static HTML page over a run's overlays, probabilities and failures."""
    from ..runs.report import build_report

    path = build_report(run_dir, out)
    out_console.print(f"report: {path}", highlight=False)
