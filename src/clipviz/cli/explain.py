"""`clipviz explain INPUT PROMPT…`: saliency maps of images, written per image with a manifest."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from ..errors import ClipvizError
from .options import (
    AlphaOpt,
    ChannelsLastOpt,
    ColormapOpt,
    CompileOpt,
    CropOpt,
    DebugOpt,
    DeviceOpt,
    EclipOpt,
    GaeStartOpt,
    GscorecamTopkOpt,
    JsonOpt,
    LegradLayersOpt,
    MaxPixelsOpt,
    MethodOpt,
    ModelConfigOpt,
    ModelOpt,
    OptionOpt,
    PrecisionOpt,
    PretrainedOpt,
    QuietOpt,
    ReportOpt,
    ResolutionOpt,
    SurgeryDepthOpt,
    TableFormatOpt,
    chosen_methods,
    encode_with_progress,
    gather_method_options,
    load,
    unique_prompts,
    warn_truncated,
)
from .output import (
    err_console,
    out_console,
    print_failure,
    print_json,
    print_table,
    progress_bar,
    set_table_format,
    torchrun_job,
)


def explain(
    input: Annotated[
        str | None,
        typer.Argument(
            help="an image, a folder, a quoted glob ('photos/*.jpg') or WebDataset shards "
            "('data/{00000..00099}.tar')",
            show_default=False,
        ),
    ] = None,
    prompts: Annotated[
        list[str] | None,
        typer.Argument(help="texts to explain, e.g. dog 'a red car'", show_default=False),
    ] = None,
    prompt: Annotated[
        list[str] | None,
        typer.Option("-p", "--prompt", help="a text to explain (repeatable)", show_default=False),
    ] = None,
    prompts_file: Annotated[
        str | None, typer.Option("--prompts-file", help="one prompt per line ('-' for stdin)")
    ] = None,
    inputs_file: Annotated[
        str | None,
        typer.Option(
            "--inputs-file",
            help="one image path per line ('-' for stdin); then every positional is a prompt",
        ),
    ] = None,
    method: MethodOpt = None,
    option: OptionOpt = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="output folder")] = Path("clipviz-out"),
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="images per pass")] = 16,
    recursive: Annotated[
        bool, typer.Option("--recursive", "-r", help="descend into folders")
    ] = False,
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite",
            help="redo finished images; write into a folder that is not a clipviz run",
        ),
    ] = False,
    save: Annotated[
        list[str] | None,
        typer.Option(
            "--save",
            help="what to write per image: all (default), maps (maps.npz), overlays (with the "
            "comparison sheet), heatmaps; repeatable",
            show_default=False,
        ),
    ] = None,
    render_size: Annotated[
        int, typer.Option("--render-size", help="long side of rendered PNGs and upsampled maps")
    ] = 4096,
    maps_dtype: Annotated[
        str | None,
        typer.Option(
            "--maps-dtype",
            help="type of the raw maps: float32 or float16 (default: float32 in maps.npz, "
            "float16 in shards)",
            show_default=False,
        ),
    ] = None,
    colormap: ColormapOpt = "jet",
    alpha: AlphaOpt = 0.5,
    crop: CropOpt = "none",
    no_ensemble: Annotated[
        bool, typer.Option("--no-ensemble", help="embed prompts as given, without templates")
    ] = False,
    model: ModelOpt = None,
    pretrained: PretrainedOpt = None,
    model_config: ModelConfigOpt = None,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    resolution: ResolutionOpt = None,
    compile: CompileOpt = False,
    channels_last: ChannelsLastOpt = None,
    workers: Annotated[
        int | None,
        typer.Option(
            "--workers", help="image-decoding processes (default: up to 4)", show_default=False
        ),
    ] = None,
    writers: Annotated[
        int | None,
        typer.Option(
            "--writers",
            help="threads writing outputs while the model runs (default: up to 4; 0: none)",
            show_default=False,
        ),
    ] = None,
    max_pixels: MaxPixelsOpt = 100_000_000,
    quiet: QuietOpt = False,
    json_out: JsonOpt = False,
    table_format: TableFormatOpt = "table",
    report: ReportOpt = False,
    surgery_depth: SurgeryDepthOpt = None,
    gae_start_layer: GaeStartOpt = None,
    legrad_layers: LegradLayersOpt = None,
    gscorecam_topk: GscorecamTopkOpt = None,
    eclip: EclipOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Saliency maps of INPUT for each prompt: `clipviz explain photo.jpg dog "a red car"`.

    Under torchrun (`torchrun --nproc_per_node G -m clipviz explain …`) every process takes
    its share of the images or shards; the manifest holds them all at the end."""
    from ..data.inputs import collect_inputs, read_list_file
    from ..data.shards import is_shard_spec, shard_paths
    from ..distributed import refuse_stdin, setup_distributed
    from ..runs.explain import RenderOptions, check_run_args, run_explain
    from ..runs.outputs import SAVE_KINDS
    from ..runs.prepare import check_out_folder

    set_table_format(table_format)
    positional = list(prompts or [])
    inputs = [input] if input is not None else []
    if inputs_file is not None:
        positional, inputs = inputs + positional, []
    all_prompts = positional + list(prompt or [])
    refuse_stdin(inputs_file, prompts_file)
    if prompts_file is not None:
        all_prompts += read_list_file(prompts_file, "prompts file")
    if not inputs and inputs_file is None:
        raise ClipvizError("no input given; pass an image, a folder, a glob or --inputs-file")
    if not all_prompts:
        raise ClipvizError(
            "no prompts given; add them after the input (clipviz explain img.jpg dog) "
            "or use -p/--prompts-file"
        )
    all_prompts = unique_prompts(all_prompts)
    kinds = [k.lower() for k in (save or ["all"])]
    chosen = SAVE_KINDS if "all" in kinds else tuple(k for k in SAVE_KINDS if k in kinds)
    if unknown := [k for k in kinds if k != "all" and k not in SAVE_KINDS]:
        raise ClipvizError(
            f"--save {unknown[0]}: choose from all, {', '.join(SAVE_KINDS)} (repeatable)"
        )
    shards = len(inputs) == 1 and is_shard_spec(inputs[0])
    render = RenderOptions(colormap, alpha, chosen, render_size, maps_dtype or "float32")
    methods = chosen_methods(method, eclip)
    options = gather_method_options(
        methods, option, surgery_depth, gae_start_layer, legrad_layers, gscorecam_topk, eclip
    )
    check_run_args(out, batch_size, workers, max_pixels, writers)
    check_out_folder(out, "shards" if shards else "explain", overwrite)
    shard_files = shard_paths(inputs[0]) if shards else []
    items, ignored = (
        ([], 0)
        if shards
        else collect_inputs(inputs, recursive=recursive, inputs_file=inputs_file, exclude=[out])
    )
    if not items and not shard_files:
        raise ClipvizError(
            f"no images found in {', '.join(inputs) or inputs_file}; pass image files, a folder "
            "of images (--recursive for its subfolders) or a quoted glob",
        )

    dist, device = setup_distributed(device)
    quiet = quiet or not dist.main
    with torchrun_job(dist):
        backend = load(model, pretrained, model_config, device, precision, resolution, crop,
                       compile=compile, channels_last=channels_last)  # fmt: skip
        warn_truncated(backend, all_prompts, not no_ensemble)
        texts = encode_with_progress(backend, all_prompts, not no_ensemble, quiet)
        started = time.perf_counter()
        unit = "shard" if shards else "img"
        progress = progress_bar("explaining", quiet, "rate", transient=True)
        task = progress.add_task(
            "explain", total=len((shard_files or items)[dist.rank :: dist.world]), rate=""
        )

        def on_record(rec: dict[str, Any]) -> None:
            n = progress.tasks[0].completed + 1
            rate = n / max(time.perf_counter() - started, 1e-9)
            progress.update(task, advance=1, rate=f"{rate:.1f} {unit}/s")

        with progress:
            if shards:
                from ..runs.shards import run_explain_shards

                summary = run_explain_shards(
                    backend, shard_files, texts, out, methods=methods, batch_size=batch_size,
                    overwrite=overwrite, workers=workers, max_pixels=max_pixels,
                    on_record=on_record, method_options=options,
                    maps_dtype=maps_dtype or "float16", dist=dist,
                )  # fmt: skip
            else:
                summary = run_explain(
                    backend, items, texts, out, methods=methods, batch_size=batch_size,
                    overwrite=overwrite, render=render, workers=workers,
                    max_pixels=max_pixels, on_record=on_record, method_options=options,
                    writers=writers, dist=dist,
                )  # fmt: skip
    if not dist.main:  # rank 0 holds the whole job's summary and carries its exit code
        raise typer.Exit(0)
    if report:
        from .report import write_any_report

        page = write_any_report(out)
        if not json_out:
            out_console.print(f"report: {page}", highlight=False)
    if json_out:
        print_json(run_payload(summary, out, ignored))
    elif not quiet:
        if shards:
            print_shard_summary(summary, out)
        else:
            print_summary(summary, out, ignored)
        if dist.world > 1:
            out_console.print(f"({dist.world} processes, counted together)", highlight=False)
    raise typer.Exit(summary.exit_code)


def run_payload(summary: Any, out: Path, ignored: int) -> dict[str, Any]:
    """What `--json` prints for a run: counts, where things are, every image's record."""
    return {
        "out": str(out),
        "manifest": str(out / "manifest.jsonl"),
        "ok": summary.ok,
        "skipped": summary.skipped,
        "failed": summary.failed,
        "ignored": ignored,
        "records": summary.records,
    }


def print_shard_summary(summary: Any, out: Path) -> None:
    for r in summary.records:
        if r["status"] == "failed":
            print_failure(r["input"], r["error"])
    shards = len(summary.records)
    out_console.print(
        f"{shards} shard(s): {summary.ok} samples ok, {summary.skipped} skipped (shards done "
        f"before), {summary.failed} failed — outputs in {out / 'shards'}/, manifest "
        f"{out / 'manifest.jsonl'}",
        highlight=False,
    )


def print_summary(summary: Any, out: Path, ignored: int, rows: int = 20) -> None:
    done = [r for r in summary.records if r["status"] != "failed"]
    if done:
        table = Table(title="Top prompt per image", title_justify="left")
        table.add_column("image", overflow="fold")
        table.add_column("top prompt")
        table.add_column("p", justify="right")
        table.add_column("status")
        for r in done[:rows]:
            top = r.get("top", "")
            p = r.get("probs", {}).get(top)
            table.add_row(r["output"], top, f"{p:.3f}" if p is not None else "", r["status"])
        if len(done) > rows:
            table.add_row(f"… {len(done) - rows} more in {out / 'manifest.jsonl'}", "", "", "")
        print_table(table)
    failed = [r for r in summary.records if r["status"] == "failed"]
    for r in failed[:50]:
        print_failure(r["input"], r["error"])
    if len(failed) > 50:
        err_console.print(f"… and {len(failed) - 50} more failures in the manifest")
    extra = f", {ignored} non-image files ignored" if ignored else ""
    out_console.print(
        f"{summary.ok} ok, {summary.skipped} skipped, {summary.failed} failed{extra} — "
        f"outputs in {out}/, manifest {out / 'manifest.jsonl'}",
        highlight=False,
    )
