"""`clipviz report RUN_DIR`: one static HTML page over a run's outputs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from ..errors import ClipvizError
from .options import DebugOpt
from .output import err_console, out_console


def report(
    run_dir: Annotated[
        Path,
        typer.Argument(
            help="the --out folder of an explain or concepts run, an eval results JSON or "
            "the folder holding eval results",
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
    for path in write_reports(run_dir, out):
        out_console.print(f"report: {path}", highlight=False, soft_wrap=True)


def write_reports(path: Path, out: Path | None = None) -> list[Path]:
    """The report of a run folder or of an eval results JSON; of a folder of eval results
    (no manifest), the page of each results JSON in it."""
    from ..runs.manifest import MANIFEST
    from ..runs.shards import is_shard_run

    if path.is_dir() and not (path / MANIFEST).is_file() and not is_shard_run(path):
        from ..runs.eval_report import build_eval_report, eval_results_in

        found = eval_results_in(path)
        if not found:
            raise ClipvizError(
                f"{path} has no {MANIFEST} and no eval results JSON; pass the --out folder of "
                "an explain or concepts run, or an eval results JSON"
            )
        if out is not None and len(found) > 1:
            raise ClipvizError(
                f"{path} holds {len(found)} eval results ({', '.join(p.name for p in found)}); "
                "pass one of them with --out, or drop --out to write each one's page beside it"
            )
        return [build_eval_report(p, out) for p in found]
    return [write_any_report(path, out)]


def write_any_report(path: Path, out: Path | None = None) -> Path:
    """The report of a run folder or of an eval results JSON; records left out of the page
    (files outside the run folder) are warned about on stderr."""
    if path.is_file() and path.suffix == ".json":
        from ..runs.eval_report import build_eval_report

        return build_eval_report(path, out)
    from ..runs.report import build_report
    from ..runs.shards import is_shard_run

    if is_shard_run(path):
        from ..runs.shard_report import build_shard_report

        return build_shard_report(path, out, warn=_warn)
    return build_report(path, out, warn=_warn)


def _warn(message: str) -> None:
    err_console.print(f"[yellow]warning:[/] {escape(message)}", highlight=False, soft_wrap=True)
