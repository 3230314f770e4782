"""`clipviz concepts` and `clipviz concepts-ood`: ConVis from the command line.

Registered on the app of `clipviz.cli`, which imports this module at its end.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import torch
import typer
from rich.table import Table

from .cli import (
    AlphaOpt,
    ColormapOpt,
    DebugOpt,
    DeviceOpt,
    MaxPixelsOpt,
    ModelConfigOpt,
    ModelOpt,
    PrecisionOpt,
    PretrainedOpt,
    QuietOpt,
    ResolutionOpt,
    _handle_errors,
    _load,
    app,
    err_console,
    out_console,
    progress_bar,
)
from .errors import ClipvizError

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


@contextmanager
def _embedding_progress(quiet: bool) -> Iterator[Callable[[int, int], None]]:
    """A progress bar that appears only if concept texts actually need embedding."""
    progress = progress_bar("embedding concepts", quiet, transient=True)
    task: list[Any] = []

    def update(done: int, total: int) -> None:
        if not task:
            task.append(progress.add_task("embed", total=total))
        progress.update(task[0], completed=done)

    with progress:
        yield update


def _concept_row(name: str) -> tuple[str, str]:
    from .wordnet import noun_database

    db = noun_database()
    i = db.position[name]
    return db.lemmas[i][0].replace("_", " "), db.definitions[i]


@app.command("concepts")
@_handle_errors
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
    debug: DebugOpt = False,
) -> None:
    """ConVis maps of WordNet concepts: `clipviz concepts photo.jpg --synset dog.n.01`, or
    `--top 5` to discover the concepts in the image."""
    from .batch import RenderOptions
    from .convis import concept_bank
    from .data import collect_inputs
    from .files import write_json_atomic
    from .render import COLORMAPS
    from .wordnet import load_hierarchy, noun_database, resolve_concepts

    if not synset and not word and top < 1:
        raise ClipvizError("no concepts asked for; pass --synset dog.n.01, --word dog or --top K")
    if top < 0:
        raise ClipvizError(f"--top {top} must be positive")
    if colormap not in COLORMAPS:
        raise ClipvizError(f"unknown colormap {colormap!r}; choose from: {', '.join(COLORMAPS)}")
    if not 0.0 <= alpha <= 1.0:
        raise ClipvizError(f"--alpha {alpha} is outside [0, 1]")
    if batch_size < 1:
        raise ClipvizError(f"--batch-size {batch_size} must be at least 1")
    chosen, ambiguous = resolve_concepts(synset or [], word or [])
    db = noun_database()
    for w, senses in ambiguous.items():
        others = "; ".join(f"{s} ({db.definitions[db.position[s]]})" for s in senses[1:6])
        more = f" and {len(senses) - 6} more" if len(senses) > 6 else ""
        err_console.print(
            f"[yellow]{w}[/] has {len(senses)} senses: using {senses[0]} "
            f"({db.definitions[db.position[senses[0]]]}); others: {others}{more} "
            "— choose one with --synset",
            highlight=False,
            soft_wrap=True,
        )
    load_hierarchy(vocabulary)  # a bad vocabulary fails before the model loads
    items, ignored = collect_inputs(images, recursive=recursive)
    if not items:
        raise ClipvizError(f"no images found in {', '.join(images)}", exit_code=1)

    backend = _load(model, pretrained, model_config, device, precision, resolution)
    with _embedding_progress(quiet) as on_embed:
        bank = concept_bank(backend, vocabulary, embed, extra=chosen, progress=on_embed)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(
        out / "run.json",
        {
            "model": backend.identity,
            "device": str(backend.device),
            "method": f"convis-{variant}",
            "concepts": chosen,
            "top": top,
            "vocabulary": vocabulary,
            "hierarchy_size": len(bank.hierarchy),
            "embed": embed,
            "seed": seed,
            "started": datetime.now(UTC).isoformat(timespec="seconds"),
        },
    )
    progress = progress_bar("concepts", quiet)
    records: list[dict[str, Any]] = []
    render = RenderOptions(colormap, alpha)
    options = {"variant": variant, "seed": seed, "top": top, "batch_size": batch_size}
    with progress:
        task = progress.add_task("concepts", total=len(items))
        for item in items:
            records.append(
                _concepts_one(backend, bank, item, chosen, options, out, render, max_pixels)
            )
            progress.advance(task)
    failed = [r for r in records if r["status"] == "failed"]
    if not quiet:
        _print_concepts_table(records, discovery=top > 0)
        for r in failed[:50]:
            err_console.print(f"[red]failed[/] {r['input']}: {r['error']}", highlight=False)
        extra = f", {ignored} non-image files ignored" if ignored else ""
        out_console.print(
            f"{len(records) - len(failed)} ok, {len(failed)} failed{extra} — outputs in {out}/, "
            f"manifest {out / 'manifest.jsonl'}",
            highlight=False,
        )
    raise typer.Exit(1 if failed else 0)


def _concepts_one(
    backend: Any,
    bank: Any,
    item: Any,
    chosen: Sequence[str],
    options: dict[str, Any],
    out: Path,
    render: Any,
    max_pixels: int,
) -> dict[str, Any]:
    """Maps, files and the manifest line of one image."""
    from PIL import Image

    from .batch import write_outputs
    from .convis import concept_maps, square_box
    from .data import ImageError, load_image
    from .explain import Explanation
    from .files import append_jsonl

    started = time.perf_counter()
    rec: dict[str, Any] = {"input": str(item.path.resolve()), "output": str(item.rel)}
    try:
        image = load_image(item.path, max_pixels)
    except ImageError as e:
        rec.update(status="failed", error=str(e), outputs=[], seconds=0.0)
        append_jsonl(out / "manifest.jsonl", rec)
        return rec
    result = concept_maps(backend, image, chosen, bank=bank, **options)
    x = backend.preprocess(Image.fromarray(result.square))[None]
    idx = [bank.hierarchy.index(c) for c in result.concepts]
    image_emb = backend.image_embeddings(x).float()
    scores = (image_emb @ bank.embeddings[idx].float().T).cpu()  # [1, S]
    probs = (backend.logit_scale * scores).softmax(dim=-1)
    explanation = Explanation(
        method=f"convis-{options['variant']}",
        prompts=result.concepts,
        maps=result.maps[None].float(),
        scores=scores,
        probs=probs,
    )
    square = np.asarray(image.crop(square_box(image.size)))
    files = write_outputs(out / item.rel, square, [explanation], 0, render)
    found = {d.synset for d in result.discovered}
    rec.update(
        status="ok",
        error=None,
        outputs=files,
        size=[image.width, image.height],
        crop=list(square_box(image.size)),
        concepts=[
            {
                "synset": name,
                "lemma": _concept_row(name)[0],
                "definition": _concept_row(name)[1],
                "best_rank": rank,
                "score": float(score),
                "discovered": name in found,
            }
            for name, rank, score in zip(
                result.concepts, result.best_ranks, scores[0].tolist(), strict=True
            )
        ],
        seconds=round(time.perf_counter() - started, 4),
    )
    append_jsonl(out / "manifest.jsonl", rec)
    return rec


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
    out_console.print(table)


@app.command("concepts-ood")
@_handle_errors
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
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
    debug: DebugOpt = False,
) -> None:
    """ConVis's check of WordNet: AUROC of in- vs out-of-distribution images, scored by the
    hierarchy (max cosine with the definitions of the synset's leaves) or by its own definition."""
    from .convis import ood_check
    from .data import collect_inputs
    from .files import write_json_atomic
    from .wordnet import leaves, resolve_concepts

    name = resolve_concepts([in_synset])[0][0]
    n_leaves = len(leaves(name))
    sets = {}
    for label, folder in (("in-distribution", id_images), ("out-of-distribution", ood_images)):
        if not folder.is_dir():
            raise ClipvizError(f"{label} folder {folder} does not exist")
        items, _ = collect_inputs([str(folder)], recursive=recursive)
        if not items:
            raise ClipvizError(f"no images in the {label} folder {folder}")
        sets[label] = items
    backend = _load(model, pretrained, model_config, device, precision, resolution)
    embeddings, failed = {}, []
    for label, items in sets.items():
        embeddings[label], bad = _embed_images(backend, items, batch_size)
        failed += bad
    with _embedding_progress(quiet) as on_embed:
        result = ood_check(
            backend,
            name,
            embeddings["in-distribution"],
            embeddings["out-of-distribution"],
            embed,
            on_embed,
        )
    summary = {
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
        out_console.print(table)
        for path, error in failed[:20]:
            err_console.print(f"[red]failed[/] {path}: {error}", highlight=False)
    raise typer.Exit(1 if failed else 0)


def _embed_images(
    backend: Any, items: Sequence[Any], batch_size: int
) -> tuple[torch.Tensor, list[tuple[str, str]]]:
    """Image embeddings `[N, D]` of the readable items, and (path, error) of the others."""
    from .data import ImageError, load_image

    tensors, failed = [], []
    for item in items:
        try:
            tensors.append(backend.preprocess(load_image(item.path)))
        except ImageError as e:
            failed.append((str(item.path), str(e)))
    if not tensors:
        raise ClipvizError("none of the images could be read", exit_code=1)
    chunks = [
        backend.image_embeddings(torch.stack(tensors[i : i + batch_size])).cpu()
        for i in range(0, len(tensors), max(batch_size, 1))
    ]
    return torch.cat(chunks), failed
