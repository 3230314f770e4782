"""What the command line prints: the consoles, progress bars, tables that stay readable when
piped, and errors as one line with the flag names the user typed."""

from __future__ import annotations

import contextlib
import functools
import os
import re
import traceback
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import click
import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from ..errors import ClipvizError

out_console = Console()
err_console = Console(stderr=True)

F = TypeVar("F", bound=Callable[..., Any])

# Library errors name parameters in backticks (`batch_size`); on the command line they are
# the flags. One table for every command; names not listed stay as they are.
FLAGS = {
    "model": "--model",
    "pretrained": "--pretrained",
    "model_config": "--model-config",
    "device": "--device",
    "precision": "--precision",
    "resolution": "--resolution",
    "compile": "--compile",
    "channels_last": "--channels-last",
    "crop": "--crop",
    "batch_size": "--batch-size",
    "workers": "--workers",
    "max_pixels": "--max-pixels",
    "colormap": "--colormap",
    "alpha": "--alpha",
    "method": "--method",
    "metric": "--metric",
    "prompts": "--prompts",
    "repeats": "--repeats",
    "out": "--out",
    "json": "--json",
    "overwrite": "--overwrite",
    "checkpoint": "--eclip",
    "embed": "--embed",
    "vocabulary": "--vocabulary",
    "variant": "--variant",
    "top": "--top",
    "split": "--split",
    "limit": "--limit",
    "epochs": "--epochs",
    "steps": "--steps",
    "accum_steps": "--accum-steps",
    "checkpoint_every": "--checkpoint-every",
    "log_every": "--log-every",
    "lr": "--lr",
    "weight_decay": "--weight-decay",
    "warmup": "--warmup",
    "distill": "--distill",
    "mask_value": "--mask-value",
    "train_ln_post": "--train-ln-post",
    "resume": "--resume",
    "images": "--images",
    "format": "--format",
    "synset": "--synset",
    "word": "--word",
    "classes_file": "--classes-file",
    "reduce_zero_label": "--reduce-zero-label",
}


def as_flags(message: str) -> str:
    """A library message with its backticked parameter names as command-line flags."""
    return re.sub(r"`(\w+)`", lambda m: FLAGS.get(m.group(1), m.group(0)), message)


def progress_bar(label: str, quiet: bool, *fields: str, transient: bool = False) -> Progress:
    """The rich progress bar of every command: label, bar, done/total, `fields` (task field
    names shown as text), time left; on stderr, so tables on stdout stay clean."""
    return Progress(
        TextColumn(f"[bold]{label}"),
        BarColumn(),
        MofNCompleteColumn(),
        *(TextColumn(f"{{task.fields[{name}]}}") for name in fields),
        TimeRemainingColumn(),
        console=err_console,
        disable=quiet,
        transient=transient,
    )


@contextlib.contextmanager
def lazy_progress(label: str, quiet: bool) -> Iterator[Callable[[int, int], None]]:
    """A `(done, total)` callback whose progress bar appears on its first call, so nothing
    shows when the work is already cached."""
    progress = progress_bar(label, quiet, transient=True)
    task: list[Any] = []

    def update(done: int, total: int) -> None:
        if not task:
            progress.start()
            task.append(progress.add_task(label, total=total))
        progress.update(task[0], completed=done)

    try:
        yield update
    finally:
        progress.stop()


PIPED_WIDTH = 120


TABLE_FORMATS = ("table", "md", "csv", "json")
_FORMAT = {"tables": "table"}


def set_table_format(fmt: str) -> None:
    """How `print_table` writes tables: `table` (rich), `md`, `csv` or `json` (one object
    per table and line: its title and its rows keyed by the headers)."""
    if fmt not in TABLE_FORMATS:
        raise ClipvizError(
            f"unknown --table-format {fmt!r}; choose from: {', '.join(TABLE_FORMATS)}"
        )
    _FORMAT["tables"] = fmt


def table_cells(table: Any) -> tuple[list[str], list[list[str]]]:
    """A rich table's headers and rows as plain text (markup removed)."""
    from rich.text import Text

    def plain(cell: Any) -> str:
        return cell.plain if isinstance(cell, Text) else Text.from_markup(str(cell)).plain

    headers = [plain(c.header) for c in table.columns]
    columns = [[plain(cell) for cell in c.cells] for c in table.columns]
    return headers, [list(row) for row in zip(*columns, strict=True)]


def _print_plain(table: Any, fmt: str) -> None:
    import csv
    import io
    import json
    import sys

    from rich.text import Text

    headers, rows = table_cells(table)
    title = table.title.plain if isinstance(table.title, Text) else str(table.title or "")
    if fmt == "json":
        line = {"title": title, "rows": [dict(zip(headers, r, strict=True)) for r in rows]}
        sys.stdout.write(json.dumps(line, ensure_ascii=False) + "\n")
    elif fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(headers)
        writer.writerows(rows)
        sys.stdout.write(buf.getvalue() + "\n")
    else:

        def cell(text: str) -> str:
            return text.replace("|", "\\|").replace("\n", " ")

        lines = [f"**{cell(title)}**", ""] if title else []
        lines.append("| " + " | ".join(cell(h) for h in headers) + " |")
        lines.append("|" + " --- |" * len(headers))
        lines += ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows]
        sys.stdout.write("\n".join(lines) + "\n\n")
    sys.stdout.flush()


def print_table(table: Any) -> None:
    """A table on stdout in the chosen format (`set_table_format`). As a rich table: when
    stdout is not a terminal (a file, a pipe), at least 120 columns and as wide as the cells
    that must not wrap, so no number is cut."""
    if _FORMAT["tables"] != "table":
        _print_plain(table, _FORMAT["tables"])
        return
    if out_console.is_terminal:
        out_console.print(table)
        return
    from rich.measure import Measurement

    probe = Console(width=100_000, force_terminal=False, file=out_console.file)
    needed = Measurement.get(probe, probe.options, table).minimum
    Console(width=max(PIPED_WIDTH, needed), force_terminal=False, file=out_console.file).print(
        table, crop=False
    )


def print_failure(source: str, error: object) -> None:
    """One failed input on stderr: its path and the reason (flags named as typed)."""
    err_console.print(
        f"[red]failed[/] {escape(str(source))}: {escape(as_flags(str(error)))}", highlight=False
    )


def print_error(error: Exception) -> None:
    """An error as the one line on stderr (flags named as typed)."""
    err_console.print(
        f"[bold red]error:[/] {escape(as_flags(str(error)))}", highlight=False, soft_wrap=True
    )


@contextlib.contextmanager
def torchrun_job(dist: Any) -> Iterator[None]:
    """Where a command's work under torchrun ends (`dist`: this rank's place; nothing to do
    without a job). Ranks that end in step (all done, or all stopped by the same `JobError`)
    meet at a final barrier, the ranks other than 0 having said that error, which they then
    leave with exit code 0: only rank 0 carries the job's code, since a rank that exits
    non-zero makes torchrun stop the others, rank 0 perhaps while it writes. A rank that
    fails alone (no collective to share it) leaves at once with its own code."""
    from ..distributed import JobError, barrier, cleanup_distributed

    in_step = False
    try:
        yield
        in_step = True
    except JobError as e:
        in_step = True
        if dist.main:
            raise
        print_error(e)
        raise typer.Exit(0) from None
    finally:
        if in_step:
            barrier(dist)
        cleanup_distributed()


def handle_errors(fn: F) -> F:
    """Turn `ClipvizError` into one line on stderr and its exit code (tracebacks with --debug)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        debug = kwargs.get("debug") or os.environ.get("CLIPVIZ_DEBUG") == "1"
        _FORMAT["tables"] = "table"  # each command chooses its own (--table-format)
        try:
            return fn(*args, **kwargs)
        except ClipvizError as e:
            if debug:
                traceback.print_exc()
            print_error(e)
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            err_console.print("interrupted; finished results are kept (re-run to resume)")
            raise typer.Exit(130) from None
        except (typer.Exit, click.exceptions.ClickException):
            raise
        except Exception as e:
            if debug:
                traceback.print_exc()
            err_console.print(
                f"[bold red]error:[/] internal error: {type(e).__name__}: {escape(str(e))} "
                "(run with --debug for the traceback)",
                highlight=False,
                soft_wrap=True,
            )
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


def print_json(payload: dict[str, Any]) -> None:
    """One machine-readable result on stdout: the run's own JSON, nothing else."""
    import json
    import sys

    from ..files import provenance

    sys.stdout.write(json.dumps({**provenance(), **payload}, ensure_ascii=False) + "\n")
    sys.stdout.flush()
