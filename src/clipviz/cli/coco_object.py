"""`clipviz coco-object ROOT`: COCO-Object labels written from COCO-Stuff-164k's raw labels."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from .options import DebugOpt, QuietOpt
from .output import out_console, print_failure


def coco_object(
    root: Annotated[
        Path,
        typer.Argument(help="COCO-Stuff root holding annotations/<split>/", show_default=False),
    ],
    split: Annotated[
        list[str] | None,
        typer.Option(
            "--split", help="splits to convert (default: train2017 and val2017)", show_default=False
        ),
    ] = None,  # fmt: skip
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="rewrite labels already converted")
    ] = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Write COCO-Object labels (`<stem>_instanceTrainIds.png`, 0 background, 1–80 the COCO
    things) beside COCO-Stuff's raw label PNGs, for `clipviz eval --task segment --format
    coco-object`. Stuff and unlabeled pixels become background."""
    from ..data.datasets.coco_object import convert_coco_object

    done = convert_coco_object(root, tuple(split or ("train2017", "val2017")), overwrite)
    for path, error in done.failed:
        print_failure(str(path), error)
    if not quiet:
        summary = {"written": len(done.written), "skipped": len(done.skipped),
                   "failed": len(done.failed)}  # fmt: skip
        out_console.print(json.dumps(summary), highlight=False)
    raise typer.Exit(int(bool(done.failed)))
