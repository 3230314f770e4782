"""`clipviz bench`: milliseconds per image of each method, against a bare forward pass."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from .options import (
    DebugOpt,
    DeviceOpt,
    EclipOpt,
    MethodOpt,
    ModelConfigOpt,
    ModelOpt,
    OptionOpt,
    PrecisionOpt,
    PretrainedOpt,
    ResolutionOpt,
    gather_method_options,
    load,
)
from .output import err_console, print_table


def bench(
    method: MethodOpt = None,
    option: OptionOpt = None,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="images per pass")] = 8,
    prompts: Annotated[int, typer.Option("--prompts", help="texts per image")] = 3,
    repeats: Annotated[int, typer.Option("--repeats", help="timed runs (median)")] = 5,
    json_path: Annotated[Path | None, typer.Option("--json", help="also write the rows")] = None,
    eclip: EclipOpt = None,
    model: ModelOpt = None,
    pretrained: PretrainedOpt = None,
    model_config: ModelConfigOpt = None,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    resolution: ResolutionOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Milliseconds per image of each method, as a multiple of a bare forward pass (default:
    every method that needs no extra input; `--eclip CKPT` adds eclip)."""
    from dataclasses import asdict

    from ..files import provenance, write_json_atomic
    from ..runs.bench import default_methods, run_bench

    names = list(dict.fromkeys(method or default_methods()))
    if eclip is not None and "eclip" not in names:
        names.append("eclip")
    options = gather_method_options(names, option, eclip=eclip)
    backend = load(model, pretrained, model_config, device, precision, resolution)
    with err_console.status("timing…"):
        rows = run_bench(backend, names, batch_size, prompts, repeats, options)
    size = "x".join(map(str, backend.input_size))
    table = Table(
        title=f"{backend.identity['model']} at {size} on {backend.device}, "
        f"batch {batch_size}, {prompts} prompts (median of {repeats})",
        title_justify="left",
    )
    table.add_column("method")
    table.add_column("ms / image", justify="right")
    table.add_column("× forward", justify="right")
    for r in rows:
        ok = r.ratio == r.ratio
        table.add_row(
            r.name, f"{r.ms_per_image:.2f}" if ok else r.note, f"{r.ratio:.2f}" if ok else ""
        )
    print_table(table)
    if json_path is not None:
        write_json_atomic(
            json_path,
            {**provenance(), "model": backend.identity, "device": str(backend.device),
             "batch_size": batch_size, "prompts": prompts, "repeats": repeats,
             "rows": [asdict(r) for r in rows]},
        )  # fmt: skip
