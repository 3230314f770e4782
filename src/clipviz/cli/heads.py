"""`clipviz heads`: describe attention heads by texts (TextSpan) over a set of images."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ..errors import ClipvizError
from .concepts import VocabularyOpt
from .options import (
    DebugOpt,
    DeviceOpt,
    ModelConfigOpt,
    ModelOpt,
    PrecisionOpt,
    PretrainedOpt,
    QuietOpt,
    ResolutionOpt,
    TableFormatOpt,
    load,
)
from .output import lazy_progress, out_console, print_failure, print_table, set_table_format


def heads(
    images: Annotated[
        list[str], typer.Argument(help="images, folders or quoted globs", show_default=False)
    ],
    texts: Annotated[
        Path | None,
        typer.Option(
            "--texts",
            help="a text bank: one description per line (default: WordNet concepts of "
            "--vocabulary, by their definitions)",
        ),
    ] = None,
    vocabulary: VocabularyOpt = "default",
    layers: Annotated[
        int,
        typer.Option(
            "--layers",
            "-l",
            help="describe the heads of the last L blocks (4, as the authors' descriptions)",
        ),
    ] = 4,
    per_head: Annotated[int, typer.Option("--per-head", "-k", help="texts chosen per head")] = 10,
    rank: Annotated[
        int, typer.Option("--rank", help="rank of the head's output span the texts are read in")
    ] = 80,
    out: Annotated[Path, typer.Option("--out", "-o", help="the JSON written")] = Path("heads.json"),
    batch_size: Annotated[int, typer.Option("--batch-size", "-b")] = 32,
    recursive: Annotated[
        bool, typer.Option("--recursive", "-r", help="descend into folders")
    ] = False,
    model: ModelOpt = None,
    pretrained: PretrainedOpt = None,
    model_config: ModelConfigOpt = None,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    resolution: ResolutionOpt = None,
    quiet: QuietOpt = False,
    table_format: TableFormatOpt = "table",
    debug: DebugOpt = False,
) -> None:
    """TextSpan: the texts each attention head of the last blocks writes into the image
    embedding, found over many images: `clipviz heads photos/ --layers 4`."""
    from ..data.inputs import collect_inputs
    from ..runs.heads import (
        collect_head_embeddings,
        concept_text_bank,
        describe_heads,
        file_bank,
        write_heads,
    )

    set_table_format(table_format)
    if per_head < 1 or rank < 1 or layers < 1:
        raise ClipvizError("--layers, --per-head and --rank must be at least 1")
    if texts is not None and not texts.is_file():
        raise ClipvizError(f"text bank {texts} does not exist; pass a file, one text per line")
    items, _ = collect_inputs(images, recursive=recursive)
    if len(items) < 2:
        raise ClipvizError(
            f"{len(items)} image(s) found in {', '.join(images)}; TextSpan reads a head's "
            "variation over images: pass at least 2 (hundreds describe heads well)"
        )
    backend = load(model, pretrained, model_config, device, precision, resolution)
    if layers > backend.vit.depth:
        depth = backend.vit.depth
        raise ClipvizError(
            f"--layers {layers} exceeds the {depth} blocks of the model; pass at most {depth}"
        )
    with lazy_progress("embedding texts", quiet) as on_embed:
        bank = (
            file_bank(backend, texts) if texts else concept_text_bank(backend, vocabulary, on_embed)
        )
    with lazy_progress("images", quiet) as on_image:
        data, names, failed = collect_head_embeddings(backend, items, layers, batch_size, on_image)
    described = describe_heads(data, names, bank, per_head, rank)
    info = {
        "images": int(data.shape[0]),
        "failed": [{"input": k, "error": e} for k, e in failed],
        "layers": layers,
        "per_head": per_head,
        "rank": rank,
        "bank": str(texts) if texts else f"wordnet:{vocabulary}",
        "bank_size": len(bank.texts),
    }
    write_heads(out, backend, described, info)
    if not quiet:
        table = Table(
            title=f"Heads of the last {layers} blocks over {data.shape[0]} images",
            title_justify="left",
        )
        table.add_column("head", no_wrap=True)
        table.add_column("explained", justify="right", no_wrap=True)
        table.add_column("texts (most variance first)", overflow="fold")
        for d in described:
            table.add_row(d.head, f"{d.explained:.0%}", "; ".join(d.texts[:5]))
        print_table(table)
        for key, error in failed[:20]:
            print_failure(key, error)
        out_console.print(f"descriptions of {len(described)} heads in {out}", highlight=False)
    raise typer.Exit(1 if failed else 0)
