"""`clipviz concepts` and `clipviz concepts-ood`: ConVis from the command line."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from rich.markup import escape
from rich.table import Table

from ..errors import ClipvizError
from .options import (
    AlphaOpt,
    ColormapOpt,
    DebugOpt,
    DeviceOpt,
    JsonOpt,
    MaxPixelsOpt,
    ModelConfigOpt,
    ModelOpt,
    PrecisionOpt,
    PretrainedOpt,
    QuietOpt,
    ReportOpt,
    ResolutionOpt,
    TableFormatOpt,
    load,
)
from .output import (
    err_console,
    lazy_progress,
    out_console,
    print_failure,
    print_json,
    print_table,
    progress_bar,
    set_table_format,
)

VocabularyOpt = Annotated[
    str,
    typer.Option(
        "--vocabulary",
        help="default (2,066 common physical-object nouns), all (every noun synset) or a "
        "file with one word or synset per line",
    ),
]
EmbedOpt = Annotated[
    Literal["definitions", "lemmas"],
    typer.Option("--embed", help="embed each synset's WordNet definition or its lemma names"),
]


def concepts(
    images: Annotated[
        list[str], typer.Argument(help="images, folders or quoted globs", show_default=False)
    ],
    synset: Annotated[
        list[str] | None,
        typer.Option("--synset", "-s", help="a WordNet noun synset, e.g. dog.n.01 (repeatable)"),
    ] = None,
    word: Annotated[
        list[str] | None,
        typer.Option("--word", "-w", help="a noun; its most frequent sense (repeatable)"),
    ] = None,
    top: Annotated[
        int, typer.Option("--top", "-k", help="discover the K concepts with the best ranks")
    ] = 0,
    variant: Annotated[
        Literal["grid", "stochastic", "dense"],
        typer.Option(
            "--variant",
            help="grid: the paper's 1,800 windows; stochastic: the paper's sampled windows; "
            "dense: ours, ranks per patch token from one forward pass",
        ),
    ] = "grid",
    vocabulary: VocabularyOpt = "default",
    embed: EmbedOpt = "definitions",
    seed: Annotated[int, typer.Option("--seed", help="seed of the noise padding")] = 0,
    out: Annotated[Path, typer.Option("--out", "-o", help="output folder")] = Path("clipviz-out"),
    batch_size: Annotated[
        int, typer.Option("--batch-size", "-b", help="windows per forward pass")
    ] = 256,
    recursive: Annotated[
        bool, typer.Option("--recursive", "-r", help="descend into folders")
    ] = False,
    overwrite: Annotated[
        bool,
        typer.Option("--overwrite", help="write into a folder that is not a clipviz run"),
    ] = False,
    colormap: ColormapOpt = "jet",
    alpha: AlphaOpt = 0.5,
    model: ModelOpt = None,
    pretrained: PretrainedOpt = None,
    model_config: ModelConfigOpt = None,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    resolution: ResolutionOpt = None,
    max_pixels: MaxPixelsOpt = 100_000_000,
    quiet: QuietOpt = False,
    json_out: JsonOpt = False,
    table_format: TableFormatOpt = "table",
    report: ReportOpt = False,
    debug: DebugOpt = False,
) -> None:
    """ConVis maps of WordNet concepts: `clipviz concepts photo.jpg --synset dog.n.01`, or
    `--top 5` to discover the concepts in the image."""
    from ..convis.bank import concept_bank
    from ..convis.hierarchy import load_hierarchy, resolve_concepts
    from ..convis.nouns import noun_database
    from ..data.inputs import collect_inputs
    from ..runs.concepts import run_concepts
    from ..runs.outputs import RenderOptions
    from ..runs.prepare import check_out_folder

    set_table_format(table_format)
    if not synset and not word and top < 1:
        raise ClipvizError("no concepts asked for; pass --synset dog.n.01, --word dog or --top K")
    if top < 0:
        raise ClipvizError(f"--top {top} must be positive")
    render = RenderOptions(colormap, alpha)
    if batch_size < 1:
        raise ClipvizError(f"--batch-size {batch_size} must be at least 1")
    chosen, ambiguous = resolve_concepts(synset or [], word or [])
    db = noun_database()
    for w, senses in ambiguous.items():
        others = "; ".join(f"{s} ({db.definitions[db.position[s]]})" for s in senses[1:6])
        more = f" and {len(senses) - 6} more" if len(senses) > 6 else ""
        err_console.print(
            f"[yellow]{escape(w)}[/] has {len(senses)} senses: using {senses[0]} "
            f"({escape(db.definitions[db.position[senses[0]]])}); others: {escape(others)}{more} "
            "— choose one with --synset",
            highlight=False,
            soft_wrap=True,
        )
    load_hierarchy(vocabulary)  # a bad vocabulary fails before the model loads
    check_out_folder(out, "concepts", overwrite)
    items, ignored = collect_inputs(images, recursive=recursive)
    if not items:
        raise ClipvizError(
            f"no images found in {', '.join(images)}; pass image files, a folder of images "
            "(--recursive for its subfolders) or a quoted glob",
        )

    backend = load(model, pretrained, model_config, device, precision, resolution)
    with lazy_progress("embedding concepts", quiet) as on_embed:
        bank = concept_bank(backend, vocabulary, embed, extra=chosen, progress=on_embed)
    progress = progress_bar("concepts", quiet, transient=True)
    with progress:
        task = progress.add_task("concepts", total=len(items))
        records = run_concepts(
            backend,
            bank,
            items,
            chosen,
            out,
            {"variant": variant, "seed": seed, "top": top, "batch_size": batch_size},
            render,
            max_pixels,
            run_info={"vocabulary": vocabulary, "embed": embed},
            on_record=lambda r: progress.advance(task),
            overwrite=overwrite,
        )
    failed = [r for r in records if r["status"] == "failed"]
    if report:
        from .report import write_any_report

        page = write_any_report(out)
        if not json_out and not quiet:
            out_console.print(f"report: {page}", highlight=False)
    if json_out:
        print_json({"out": str(out), "manifest": str(out / "manifest.jsonl"),
                    "ok": len(records) - len(failed), "failed": len(failed), "ignored": ignored,
                    "records": records})  # fmt: skip
    elif not quiet:
        _print_concepts_table(records, discovery=top > 0)
        for r in failed[:50]:
            print_failure(r["input"], r["error"])
        extra = f", {ignored} non-image files ignored" if ignored else ""
        out_console.print(
            f"{len(records) - len(failed)} ok, {len(failed)} failed{extra} — outputs in {out}/, "
            f"manifest {out / 'manifest.jsonl'}",
            highlight=False,
        )
    raise typer.Exit(1 if failed else 0)


def _print_concepts_table(
    records: Sequence[dict[str, Any]], discovery: bool, rows: int = 60
) -> None:
    title = "Concepts by best window rank" if discovery else "Concepts"
    table = Table(title=title, title_justify="left")
    table.add_column("image", overflow="fold")
    table.add_column("synset", no_wrap=True)
    table.add_column("lemma", no_wrap=True, overflow="ellipsis", max_width=20)
    table.add_column("definition", no_wrap=True, overflow="ellipsis", max_width=60)
    table.add_column("best rank", justify="right", no_wrap=True)
    table.add_column("", no_wrap=True)
    shown = 0
    for r in records:
        if r["status"] != "ok":
            continue
        for c in r["concepts"]:
            if shown == rows:
                table.add_row("…", "", "", "more in the manifest", "", "")
            shown += 1
            if shown > rows:
                continue
            rank = "" if c["best_rank"] is None else str(c["best_rank"])
            table.add_row(
                r["output"], c["synset"], c["lemma"], c["definition"], rank,
                "found" if c["discovered"] else "",
            )  # fmt: skip
    print_table(table)


def concepts_ood(
    in_synset: Annotated[
        str, typer.Option("--in-synset", help="the in-distribution synset, e.g. bird.n.01")
    ],
    id_images: Annotated[
        Path, typer.Option("--id-images", help="folder of in-distribution images")
    ],
    ood_images: Annotated[
        Path, typer.Option("--ood-images", help="folder of out-of-distribution images")
    ],
    embed: EmbedOpt = "definitions",
    recursive: Annotated[
        bool, typer.Option("--recursive", "-r", help="descend into folders")
    ] = False,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b")] = 32,
    json_path: Annotated[Path | None, typer.Option("--json", help="write the result here")] = None,
    model: ModelOpt = None,
    pretrained: PretrainedOpt = None,
    model_config: ModelConfigOpt = None,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    resolution: ResolutionOpt = None,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """ConVis's check of WordNet: AUROC of in- vs out-of-distribution images, scored by the
    hierarchy (max cosine with the definitions of the synset's leaves) or by its own definition."""
    from ..convis.hierarchy import leaves, resolve_concepts
    from ..convis.ood import ood_check
    from ..data.inputs import collect_inputs
    from ..files import provenance, write_json_atomic
    from ..runs.concepts import embed_images

    name = resolve_concepts([in_synset])[0][0]
    n_leaves = len(leaves(name))
    sets = {}
    for label, folder in (("in-distribution", id_images), ("out-of-distribution", ood_images)):
        if not folder.is_dir():
            raise ClipvizError(f"{label} folder {folder} does not exist; check the path")
        items, _ = collect_inputs([str(folder)], recursive=recursive)
        if not items:
            raise ClipvizError(
                f"no images in the {label} folder {folder}; pass a folder that holds images"
            )
        sets[label] = items
    backend = load(model, pretrained, model_config, device, precision, resolution)
    embeddings, failed = {}, []
    for label, items in sets.items():
        embeddings[label], bad = embed_images(backend, items, batch_size)
        failed += bad
    with lazy_progress("embedding concepts", quiet) as on_embed:
        result = ood_check(
            backend,
            name,
            embeddings["in-distribution"],
            embeddings["out-of-distribution"],
            embed,
            on_embed,
        )
    summary = {
        **provenance(),
        "in_synset": name,
        "leaves": n_leaves,
        "embed": embed,
        "id_images": len(result.id_scores),
        "ood_images": len(result.ood_scores),
        "auroc_hierarchy": result.auroc_hierarchy,
        "auroc_single": result.auroc_single,
        "failed": failed,
        "model": backend.identity,
    }
    if json_path is not None:
        write_json_atomic(json_path, summary)
    if not quiet:
        table = Table(
            title=f"{name}: {len(result.id_scores)} in- vs {len(result.ood_scores)} "
            "out-of-distribution images",
            title_justify="left",
        )
        table.add_column("zero-shot score")
        table.add_column("AUROC", justify="right")
        table.add_row(f"hierarchy (max over {n_leaves} leaves)", f"{result.auroc_hierarchy:.3f}")
        table.add_row("single definition", f"{result.auroc_single:.3f}")
        print_table(table)
        for path, error in failed[:20]:
            print_failure(path, error)
    raise typer.Exit(1 if failed else 0)
