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
        typer.Argument(
            help="the --out folder of an explain or concepts run, or an eval results JSON",
            show_default=False,
        ),
    ],
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            help="(default: RUN_DIR/report.html, or RESULTS.html beside the JSON)",
            show_default=False,
        ),
    ] = None,
    debug: DebugOpt = False,
) -> None:
    """One static HTML page over a run: overlays with filters and a large view (explain,
    concepts), or tables with intervals, curves and best/worst images (eval)."""
    path = write_any_report(run_dir, out)
    out_console.print(f"report: {path}", highlight=False)


def write_any_report(path: Path, out: Path | None = None) -> Path:
    """The report of a run folder or of an eval results JSON."""
    if path.is_file() and path.suffix == ".json":
        from ..runs.eval_report import build_eval_report

        return build_eval_report(path, out)
    from ..runs.report import build_report
    from ..runs.shards import is_shard_run

    if is_shard_run(path):
        from ..runs.shard_report import build_shard_report

        return build_shard_report(path, out)
    return build_report(path, out)
