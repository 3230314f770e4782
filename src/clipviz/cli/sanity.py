"""`clipviz sanity`: do a method's maps depend on the model? (cascading randomisation)"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

import typer
from rich.table import Table

from ..errors import ClipvizError
from .options import (
    DebugOpt,
    DeviceOpt,
    EclipOpt,
    JsonOpt,
    MethodOpt,
    ModelConfigOpt,
    ModelOpt,
    OptionOpt,
    PrecisionOpt,
    PretrainedOpt,
    QuietOpt,
    ResolutionOpt,
    TableFormatOpt,
    gather_method_options,
    load,
    unique_prompts,
)
from .output import (
    out_console,
    print_failure,
    print_json,
    print_table,
    progress_bar,
    set_table_format,
)

if TYPE_CHECKING:
    from ..runs.sanity import SanityResult

DEFAULT_METHODS = ("itsm", "gradcam", "random")


def sanity(
    inputs: Annotated[
        str,
        typer.Argument(
            help="images (a folder or quoted glob), or with --format a dataset root",
            show_default=False,
        ),
    ],
    prompts: Annotated[
        list[str] | None,
        typer.Argument(help="texts to explain (a dataset's images use their classes)"),
    ] = None,
    prompt: Annotated[
        list[str] | None, typer.Option("-p", "--prompt", help="a text (repeatable)")
    ] = None,
    method: MethodOpt = None,
    option: OptionOpt = None,
    format: Annotated[
        Literal["voc", "coco", "cub", "generic"] | None,
        typer.Option("--format", "-f", help="read INPUTS as a dataset of this layout"),
    ] = None,
    split: Annotated[str | None, typer.Option(help="the dataset's split")] = None,
    classes_file: Annotated[
        Path | None, typer.Option("--classes-file", help="'class: prompt' lines")
    ] = None,
    limit: Annotated[
        int, typer.Option(help="use the first N images (the test runs every method per layer)")
    ] = 100,
    threshold: Annotated[
        float,
        typer.Option(help="flag a method whose rank correlation stays at least this"),
    ] = 0.5,
    seed: Annotated[int, typer.Option(help="seed of the re-drawn weights")] = 0,
    no_ensemble: Annotated[
        bool, typer.Option("--no-ensemble", help="embed prompts as given, without templates")
    ] = False,
    out: Annotated[Path, typer.Option("--out", "-o", help="output folder")] = Path(
        "clipviz-sanity"
    ),
    batch_size: Annotated[int, typer.Option("--batch-size", "-b")] = 8,
    recursive: Annotated[
        bool, typer.Option("--recursive", "-r", help="descend into folders")
    ] = False,
    eclip: EclipOpt = None,
    model: ModelOpt = None,
    pretrained: PretrainedOpt = None,
    model_config: ModelConfigOpt = None,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    resolution: ResolutionOpt = None,
    quiet: QuietOpt = False,
    json_out: JsonOpt = False,
    table_format: TableFormatOpt = "table",
    debug: DebugOpt = False,
) -> None:
    """The model-randomisation sanity check (Adebayo et al. 2018): re-draw the image tower
    layer by layer from the top and measure how much each method's maps change."""
    import torch

    from ..data.images import ImageError, load_image
    from ..runs.sanity import sanity_check, write_sanity

    set_table_format(table_format)
    methods = list(dict.fromkeys(m.lower() for m in (method or DEFAULT_METHODS)))
    if eclip is not None and "eclip" not in methods:
        methods.append("eclip")
    options = gather_method_options(methods, option, eclip=eclip)
    if limit < 1:
        raise ClipvizError(f"--limit {limit} must be at least 1")
    _check_out(out)
    paths, classes, all_prompts = _inputs(
        inputs, [*(prompts or []), *(prompt or [])], format, split, classes_file, limit, recursive
    )
    backend = load(model, pretrained, model_config, device, precision, resolution)
    texts = backend.encode_texts(all_prompts, ensemble=not no_ensemble)
    tensors, rows, failed = [], [], []
    for path, present in zip(paths, classes, strict=True):
        try:
            tensors.append(backend.preprocess(load_image(path)))
        except ImageError as e:
            failed.append((str(path), str(e)))
            continue
        rows.append([present is None or p in present for p in all_prompts])
    if not tensors:
        raise ClipvizError("none of the images could be read", exit_code=1)
    images = torch.stack(tensors)
    pairs = torch.tensor(rows, dtype=torch.bool)
    stages = len(backend.vision.cascade())
    progress = progress_bar("randomising", quiet, transient=True)
    with progress:
        task = progress.add_task("layers", total=stages)
        result = sanity_check(
            backend, images, texts, methods, options, pairs, batch_size, seed, threshold,
            on_stage=lambda _: progress.advance(task),
        )  # fmt: skip
    info = {
        "images": len(tensors),
        "failed": [{"input": p, "error": e} for p, e in failed],
        "prompts": all_prompts,
        "ensemble": not no_ensemble,
        "seed": seed,
        "options": options,
    }
    summary = write_sanity(out, result, backend, info)
    if json_out:
        print_json({"out": str(out), "results": str(out / "sanity.json"),
                    "plot": str(out / "sanity.png"), **summary})  # fmt: skip
    elif not quiet:
        _print_sanity(result, len(tensors))
        for bad, error in failed[:20]:
            print_failure(bad, error)
        out_console.print(
            f"results: {out / 'sanity.json'}, cascade plot: {out / 'sanity.png'}", highlight=False
        )
    raise typer.Exit(1 if failed else 0)


def _inputs(
    inputs: str,
    prompts: list[str],
    format: str | None,
    split: str | None,
    classes_file: Path | None,
    limit: int,
    recursive: bool,
) -> tuple[list[Path], list[set[str] | None], list[str]]:
    """Image paths, each image's prompts (None: all) and every prompt."""
    if format is None:
        from ..data.inputs import collect_inputs

        if not prompts:
            raise ClipvizError("no prompts given; pass texts after the images, or a dataset")
        items, _ = collect_inputs([inputs], recursive=recursive)
        if not items:
            raise ClipvizError(
                f"no images found in {inputs}; pass image files, a folder of images "
                "(--recursive for its subfolders) or a quoted glob",
            )
        return (
            [i.path for i in items[:limit]],
            [None] * min(limit, len(items)),
            unique_prompts(prompts),
        )
    from ..data.datasets import open_dataset
    from ..runs.evaluate import class_prompts

    if prompts:
        raise ClipvizError("a dataset's images are explained with their classes; drop the prompts")
    dataset = open_dataset(inputs, format, split=split, limit=limit)  # type: ignore[arg-type]
    if len(dataset) == 0:
        raise ClipvizError(f"{dataset.name} has no images; check --split and the layout")
    texts = class_prompts(dataset, classes_file)
    by_class = dict(zip(dataset.classes, texts, strict=True))
    samples = [dataset[i] for i in range(len(dataset))]
    present = [{by_class[c] for c in s.classes} for s in samples]
    return [s.image_path for s in samples], present, texts  # type: ignore[return-value]


def _print_sanity(result: SanityResult, images: int) -> None:
    table = Table(
        title=f"Cascading randomisation: {images} images, {result.pairs} (image, prompt) pairs "
        "— Spearman ρ with the original maps after each layer is re-drawn",
        title_justify="left",
    )
    table.add_column("method", no_wrap=True)
    for stage in result.stages:
        table.add_column(stage.replace("block ", "b").replace("stage ", "s"), justify="right")
    table.add_column("SSIM (all random)", justify="right", no_wrap=True)
    table.add_column("", no_wrap=True)
    for name, s in result.methods.items():
        cells = ["—" if v != v else f"{v:.2f}" for v in s.spearman]
        last = "—" if s.ssim[-1] != s.ssim[-1] else f"{s.ssim[-1]:.2f}"
        table.add_row(name, *cells, last, "[red]flagged[/]" if s.flagged else "passes")
    print_table(table)


def _check_out(out: Path) -> None:
    """Refuse, before the model loads, an `out` where the results would replace a file that
    clipviz did not write (or that this process cannot write)."""
    from ..runs.prepare import check_results_file

    check_results_file(out / "sanity.json")
    if (out / "sanity.png").exists() and not (out / "sanity.json").exists():
        raise ClipvizError(
            f"`out` {out} holds a sanity.png that clipviz did not write; choose another folder "
            "or move that file away"
        )
