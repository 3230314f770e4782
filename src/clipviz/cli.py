"""`clipviz` command line: one thin function per subcommand — parse, call the library, print."""

from __future__ import annotations

import functools
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import click
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from .errors import ClipvizError

app = typer.Typer(
    name="clipviz",
    help="Where does CLIP look? Saliency maps for CLIP models, and their benchmarks.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
out_console = Console()
err_console = Console(stderr=True)

F = TypeVar("F", bound=Callable[..., Any])

# -- options shared by the commands that load a model ----------------------------------------
ModelOpt = Annotated[
    str | None,
    typer.Option(
        "--model",
        help="open_clip architecture (ViT-B-16, RN50, …), hf-hub:org/repo or local-dir:PATH. "
        "[default: ViT-B-16, or the --model-config stem]",
        show_default=False,
    ),
]
PretrainedOpt = Annotated[
    str | None,
    typer.Option(
        "--pretrained",
        help="open_clip tag (openai, laion2b_s34b_b88k, …), a weights file "
        "(.safetensors/.pt/.bin) or 'random'. [default: openai where available]",
        show_default=False,
    ),
]
ModelConfigOpt = Annotated[
    Path | None,
    typer.Option("--model-config", help="custom architecture JSON, registered under its stem"),
]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps")]
PrecisionOpt = Annotated[
    Literal["auto", "fp32", "bf16", "fp16"],
    typer.Option(
        "--precision",
        help="autocast dtype on CUDA (auto: bf16 where supported); CPU always runs fp32",
    ),
]
ResolutionOpt = Annotated[
    int | None,
    typer.Option("--resolution", help="run the image tower at this size (e.g. 448)"),
]
CropOpt = Annotated[
    Literal["none", "center"],
    typer.Option(
        "--crop",
        help="none: resize the whole image; center: open_clip's eval crop",
    ),
]
DebugOpt = Annotated[bool, typer.Option("--debug", help="show tracebacks of errors")]
ColormapOpt = Annotated[str, typer.Option(help="jet, turbo, viridis, inferno or gray")]
AlphaOpt = Annotated[float, typer.Option(help="overlay opacity of the heatmap, 0–1")]
MaxPixelsOpt = Annotated[
    int, typer.Option("--max-pixels", help="refuse images with more pixels than this")
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="no progress bar or table")]
# -- method knobs (each method takes the ones it knows) ----------------------------------
SurgeryDepthOpt = Annotated[
    int | None, typer.Option("--surgery-depth", help="surgery: last K blocks [default: 6]")
]
GaeStartOpt = Annotated[
    int | None,
    typer.Option("--gae-start-layer", help="gae: first block (-1 = last) [default: all]"),
]
LegradLayersOpt = Annotated[
    int | None, typer.Option("--legrad-layers", help="legrad: last L blocks [default: 2]")
]
GscorecamTopkOpt = Annotated[
    int | None, typer.Option("--gscorecam-topk", help="gscorecam: channels kept [default: 300]")
]
EclipOpt = Annotated[
    Path | None, typer.Option("--eclip", help="eclip: checkpoint from `clipviz train`")
]


def _method_options(
    depth: int | None,
    start_layer: int | None,
    layers: int | None,
    topk: int | None,
    eclip: Path | None,
) -> dict[str, Any]:
    options: dict[str, Any] = {
        "depth": depth,
        "start_layer": start_layer,
        "layers": layers,
        "topk": topk,
        "eclip": str(eclip) if eclip is not None else None,
    }
    return {k: v for k, v in options.items() if v is not None}


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


def _handle_errors(fn: F) -> F:
    """Turn `ClipvizError` into one line on stderr and its exit code (tracebacks with --debug)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        debug = kwargs.get("debug") or os.environ.get("CLIPVIZ_DEBUG") == "1"
        try:
            return fn(*args, **kwargs)
        except ClipvizError as e:
            if debug:
                traceback.print_exc()
            err_console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
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
                f"[bold red]error:[/] internal error: {type(e).__name__}: {e} "
                "(run with --debug for the traceback)",
                highlight=False,
                soft_wrap=True,
            )
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


def _load(
    model: str | None,
    pretrained: str | None,
    model_config: Path | None,
    device: str,
    precision: str,
    resolution: int | None = None,
    crop: str = "none",
) -> Any:
    from .loading import load_backend

    with err_console.status("loading model…"):
        return load_backend(
            model=model,
            pretrained=pretrained,
            model_config=model_config,
            device=device,
            precision=precision,  # type: ignore[arg-type]
            resolution=resolution,
            crop=crop,  # type: ignore[arg-type]
        )


@app.command()
@_handle_errors
def explain(
    input: Annotated[
        str | None,
        typer.Argument(
            help="an image, a folder or a quoted glob ('photos/*.jpg')", show_default=False
        ),
    ] = None,
    prompts: Annotated[
        list[str] | None, typer.Argument(help="texts to explain, e.g. dog 'a red car'")
    ] = None,
    prompt: Annotated[
        list[str] | None, typer.Option("-p", "--prompt", help="a text to explain (repeatable)")
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
    method: Annotated[
        list[str] | None, typer.Option("--method", "-m", help="method(s) to run [default: itsm]")
    ] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="output folder")] = Path("clipviz-out"),
    batch_size: Annotated[int, typer.Option("--batch-size", "-b")] = 16,
    recursive: Annotated[
        bool, typer.Option("--recursive", "-r", help="descend into folders")
    ] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="redo finished images")] = False,
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
    workers: Annotated[
        int | None, typer.Option("--workers", help="image-decoding processes [default: auto]")
    ] = None,
    max_pixels: MaxPixelsOpt = 100_000_000,
    quiet: QuietOpt = False,
    surgery_depth: SurgeryDepthOpt = None,
    gae_start_layer: GaeStartOpt = None,
    legrad_layers: LegradLayersOpt = None,
    gscorecam_topk: GscorecamTopkOpt = None,
    eclip: EclipOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Saliency maps of INPUT for each prompt: `clipviz explain photo.jpg dog "a red car"`."""
    from .batch import RenderOptions, run_explain
    from .data import collect_inputs, read_list_file
    from .render import COLORMAPS

    positional = list(prompts or [])
    inputs = [input] if input is not None else []
    if inputs_file is not None:
        positional, inputs = inputs + positional, []
    all_prompts = positional + list(prompt or [])
    if prompts_file is not None:
        all_prompts += read_list_file(prompts_file, "prompts file")
    if not inputs and inputs_file is None:
        raise ClipvizError("no input given; pass an image, a folder, a glob or --inputs-file")
    if not all_prompts:
        raise ClipvizError(
            "no prompts given; add them after the input (clipviz explain img.jpg dog) "
            "or use -p/--prompts-file"
        )
    if colormap not in COLORMAPS:
        raise ClipvizError(f"unknown colormap {colormap!r}; choose from: {', '.join(COLORMAPS)}")
    if not 0.0 <= alpha <= 1.0:
        raise ClipvizError(f"--alpha {alpha} is outside [0, 1]")
    methods = list(dict.fromkeys(method or ["itsm"]))
    from .methods import get_method

    for m in methods:
        get_method(m)
    items, ignored = collect_inputs(inputs, recursive=recursive, inputs_file=inputs_file)
    if not items:
        raise ClipvizError(f"no images found in {', '.join(inputs) or inputs_file}", exit_code=1)

    backend = _load(model, pretrained, model_config, device, precision, resolution, crop)
    texts = backend.encode_texts(all_prompts, ensemble=not no_ensemble)
    started = time.perf_counter()
    progress = progress_bar("explaining", quiet, "rate")
    task = progress.add_task("explain", total=len(items), rate="")

    def on_record(rec: dict[str, Any]) -> None:
        n = progress.tasks[0].completed + 1
        rate = n / max(time.perf_counter() - started, 1e-9)
        progress.update(task, advance=1, rate=f"{rate:.1f} img/s")

    with progress:
        summary = run_explain(
            backend,
            items,
            texts,
            out,
            methods=methods,
            batch_size=batch_size,
            overwrite=overwrite,
            render=RenderOptions(colormap, alpha),
            workers=workers,
            max_pixels=max_pixels,
            on_record=on_record,
            method_options=_method_options(
                surgery_depth, gae_start_layer, legrad_layers, gscorecam_topk, eclip
            ),
        )
    if not quiet:
        _print_summary(summary, out, ignored)
    raise typer.Exit(summary.exit_code)


def _print_summary(summary: Any, out: Path, ignored: int, rows: int = 20) -> None:
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
        out_console.print(table)
    failed = [r for r in summary.records if r["status"] == "failed"]
    for r in failed[:50]:
        err_console.print(f"[red]failed[/] {r['input']}: {r['error']}", highlight=False)
    if len(failed) > 50:
        err_console.print(f"… and {len(failed) - 50} more failures in the manifest")
    extra = f", {ignored} non-image files ignored" if ignored else ""
    out_console.print(
        f"{summary.ok} ok, {summary.skipped} skipped, {summary.failed} failed{extra} — "
        f"outputs in {out}/, manifest {out / 'manifest.jsonl'}",
        highlight=False,
    )


@app.command("eval")
@_handle_errors
def eval_(
    root: Annotated[Path, typer.Argument(help="dataset root (or a COCO instances JSON)")],
    format: Annotated[
        Literal["voc", "coco", "cub", "generic"], typer.Option("--format", "-f", help="layout")
    ] = "voc",
    method: Annotated[
        list[str] | None, typer.Option("--method", "-m", help="method(s) [default: itsm]")
    ] = None,
    metric: Annotated[
        list[str] | None,
        typer.Option(
            "--metric",
            help="miou, msc, pointing, energy, maxboxacc, deletion, insertion "
            "[default: the first five]",
        ),
    ] = None,
    split: Annotated[str | None, typer.Option(help="split name (voc: val, coco: val2017)")] = None,
    limit: Annotated[int | None, typer.Option(help="score the first N images only")] = None,
    classes_file: Annotated[
        Path | None, typer.Option("--classes-file", help="'class: prompt' lines")
    ] = None,
    json_path: Annotated[
        Path | None,
        typer.Option("--json", help="results JSON [default: clipviz-eval/<dataset>.json]"),
    ] = None,
    pointing_tolerance: Annotated[
        float, typer.Option("--pointing-tolerance", help="pixels (15 for ~500 px photos)")
    ] = 15.0,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b")] = 16,
    no_ensemble: Annotated[bool, typer.Option("--no-ensemble")] = False,
    fresh: Annotated[bool, typer.Option("--fresh", help="ignore records of earlier runs")] = False,
    model: ModelOpt = None,
    pretrained: PretrainedOpt = None,
    model_config: ModelConfigOpt = None,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    resolution: ResolutionOpt = None,
    crop: CropOpt = "none",
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
    surgery_depth: SurgeryDepthOpt = None,
    gae_start_layer: GaeStartOpt = None,
    legrad_layers: LegradLayersOpt = None,
    gscorecam_topk: GscorecamTopkOpt = None,
    eclip: EclipOpt = None,
    synset: Annotated[
        list[str] | None,
        typer.Option("--synset", help="convis: the WordNet synset of each class, in class order"),
    ] = None,
    debug: DebugOpt = False,
) -> None:
    """Score methods on a dataset with masks or boxes: a methods × metrics table and a JSON."""
    from .datasets import open_dataset
    from .evaluate import (
        DEFAULT_METRICS,
        EvalOptions,
        check_metrics,
        class_prompts,
        evaluate,
        write_report,
    )
    from .methods import get_method

    methods = tuple(dict.fromkeys(method or ["itsm"]))
    for m in methods:
        get_method(m)
    dataset = open_dataset(root, format, split=split, limit=limit)
    if len(dataset) == 0:
        raise ClipvizError(f"{dataset.name} has no images; check --split and the layout")
    opts = EvalOptions(
        methods=methods,
        metrics=tuple(dict.fromkeys(metric or DEFAULT_METRICS)),
        pointing_tolerance=pointing_tolerance,
        batch_size=batch_size,
        method_options=_method_options(
            surgery_depth, gae_start_layer, legrad_layers, gscorecam_topk, eclip
        )
        | ({"synsets": list(synset)} if synset else {}),
    )
    check_metrics(opts.metrics, dataset)
    prompts = class_prompts(dataset, classes_file)
    json_path = json_path or Path("clipviz-eval") / f"{_safe_name(dataset.name)}.json"
    records_path = json_path.with_suffix(".records.jsonl")
    if fresh and records_path.exists():
        records_path.unlink()
    json_path.parent.mkdir(parents=True, exist_ok=True)

    backend = _load(model, pretrained, model_config, device, precision, resolution, crop)
    texts = backend.encode_texts(prompts, ensemble=not no_ensemble)
    progress = progress_bar("evaluating", quiet)
    task = progress.add_task("eval", total=len(dataset))
    with progress:
        results, records = evaluate(
            backend, dataset, texts, opts, records_path, on_image=lambda r: progress.advance(task)
        )
    csv_path = write_report(json_path, results, records, backend, dataset, texts, opts)
    failed = [r for r in records if r["status"] == "failed"]
    if not quiet:
        _print_eval_table(results, opts, dataset.name, len(records) - len(failed))
        for r in failed[:20]:
            err_console.print(f"[red]failed[/] {r['image']}: {r['error']}", highlight=False)
        out_console.print(f"results: {json_path}, per image: {csv_path}", highlight=False)
    raise typer.Exit(1 if failed else 0)


def _safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name).strip("_") or "dataset"


def _print_eval_table(results: dict[str, Any], opts: Any, name: str, scored: int) -> None:
    columns: list[tuple[str, str, int]] = []  # (result key, header, decimals)
    for m in opts.metrics:
        columns += {
            "miou": [("miou", "mIoU %", 1), ("miou_threshold", "τ", 2)],
            "msc": [("msc", "mSC %", 1)],
            "pointing": [("pointing", "pointing", 3), ("area", "area", 3)],
            "energy": [("energy", "energy", 3)],
            "maxboxacc": [("maxboxacc", "MaxBoxAcc %", 1), ("maxboxacc_threshold", "τ box", 2)],
            "deletion": [("deletion", "deletion ↓", 3)],
            "insertion": [("insertion", "insertion ↑", 3)],
        }[m]
    table = Table(title=f"{name}: {scored} images", title_justify="left")
    table.add_column("method", no_wrap=True)
    for _, header, _ in columns:
        table.add_column(header, justify="right", no_wrap=True)
    for method, res in results.items():
        cells = []
        for key, _, digits in columns:
            value = res.get(key)
            cells.append("—" if value is None or value != value else f"{value:.{digits}f}")
        table.add_row(method, *cells)
    out_console.print(table)


@app.command("bench")
@_handle_errors
def bench_(
    method: Annotated[
        list[str] | None, typer.Option("--method", "-m", help="method(s) [default: all]")
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b")] = 8,
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
    """Milliseconds per image of each method, as a multiple of a bare forward pass."""
    from dataclasses import asdict

    from .bench import bench
    from .files import write_json_atomic

    backend = _load(model, pretrained, model_config, device, precision, resolution)
    with err_console.status("timing…"):
        options = _method_options(None, None, None, None, eclip)
        rows = bench(backend, method, batch_size, prompts, repeats, options)
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
    out_console.print(table)
    if json_path is not None:
        write_json_atomic(
            json_path,
            {"model": backend.identity, "device": str(backend.device), "batch_size": batch_size,
             "prompts": prompts, "repeats": repeats, "rows": [asdict(r) for r in rows]},
        )  # fmt: skip


@app.command()
@_handle_errors
def report(
    run_dir: Annotated[Path, typer.Argument(help="the --out folder of a clipviz explain run")],
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="[default: RUN_DIR/report.html]")
    ] = None,
    debug: DebugOpt = False,
) -> None:
    """One static HTML page over a run's overlays, probabilities and failures."""
    from .report import build_report

    path = build_report(run_dir, out)
    out_console.print(f"report: {path}", highlight=False)


@app.command()
@_handle_errors
def models(
    debug: DebugOpt = False,
) -> None:
    """List open_clip architectures, their pretrained tags, and which weights are cached."""
    import open_clip

    from .loading import cached_tags

    cached = cached_tags()
    table = Table(title="open_clip models (clipviz supports ViT and ModifiedResNet towers)")
    table.add_column("model")
    table.add_column("pretrained tags (* = cached locally)", overflow="fold")
    for name in open_clip.list_models():
        tags = open_clip.list_pretrained_tags_by_model(name)
        if not tags:
            continue
        shown = [f"{t}*" if (name, t) in cached else t for t in tags]
        table.add_row(name, ", ".join(shown))
    out_console.print(table)


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except SystemExit as e:
        sys.exit(e.code)


# Commands defined in their own modules register themselves on `app`.
from . import cli_concepts as _cli_concepts  # noqa: E402,F401
from . import cli_train as _cli_train  # noqa: E402,F401

if __name__ == "__main__":
    main()
