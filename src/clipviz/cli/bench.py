"""`clipviz bench`: milliseconds per image of each method, against a bare forward pass."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from ..errors import ClipvizError
from .options import (
    ChannelsLastOpt,
    CompileOpt,
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
    repeats: Annotated[
        int | None,
        typer.Option("--repeats", help="timed rounds (median; default 5, 3 with --pipeline)"),
    ] = None,
    json_path: Annotated[Path | None, typer.Option("--json", help="also write the rows")] = None,
    pipeline: Annotated[
        Path | None,
        typer.Option(
            "--pipeline",
            help="time `explain` over this folder of images end to end (default outputs, "
            "written to a temporary folder) against the bare forward pass",
            show_default=False,
        ),
    ] = None,
    segment: Annotated[
        Path | None,
        typer.Option(
            "--segment",
            help="time `segment` over this folder of images end to end (labels and overlays "
            "written to a temporary folder) against the bare forward over the same windows",
            show_default=False,
        ),
    ] = None,
    preset: Annotated[
        str,
        typer.Option("--preset", help="the segment protocol and classes (--segment)"),
    ] = "voc21",
    workers: Annotated[
        int | None, typer.Option("--workers", help="decoding processes (--pipeline, --segment)")
    ] = None,
    writers: Annotated[
        int | None, typer.Option("--writers", help="writer threads (--pipeline, --segment)")
    ] = None,
    eclip: EclipOpt = None,
    model: ModelOpt = None,
    pretrained: PretrainedOpt = None,
    model_config: ModelConfigOpt = None,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    resolution: ResolutionOpt = None,
    compile: CompileOpt = False,
    channels_last: ChannelsLastOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Milliseconds per image of each method, as a multiple of a bare forward pass (default:
    every method that needs no extra input; `--eclip CKPT` adds eclip); with `--pipeline DIR`
    the images per second of a whole `explain` run over DIR instead; with `--segment DIR` the
    windows per second of a whole `segment` run over DIR (`--method`, default sclip, on
    `--preset`'s settings and classes). Every figure is the median of the rounds with the
    fastest and slowest; a spread above 20 % is flagged."""
    from dataclasses import asdict

    from ..files import provenance, write_json_atomic
    from ..runs.bench import (
        NOISY_SPREAD,
        default_methods,
        run_bench,
        run_pipeline_bench,
        run_segment_bench,
    )

    if pipeline is not None and segment is not None:
        raise ClipvizError("give --pipeline or --segment, not both")
    folder = pipeline if pipeline is not None else segment
    if segment is not None:
        names = list(dict.fromkeys(method or ["sclip"]))
        if len(names) > 1:
            raise ClipvizError("--segment times one method; pass one --method")
    elif pipeline is not None:
        names = list(dict.fromkeys(method or ["itsm"]))
    else:
        names = list(dict.fromkeys(method or default_methods()))
    if eclip is not None and "eclip" not in names:
        names.append("eclip")
    options = gather_method_options(names, option, eclip=eclip)
    rounds = repeats if repeats is not None else (3 if folder is not None else 5)
    items: list[Any] = []
    if folder is not None:
        from ..data.inputs import collect_inputs

        flag = "--pipeline" if pipeline is not None else "--segment"
        if not folder.is_dir():
            raise ClipvizError(f"{flag} {folder} is not a folder; pass a folder of images")
        items, _ = collect_inputs([str(folder)])
    if segment is not None:
        from ..segment import get_preset

        chosen = get_preset(preset, names[0])
    backend = load(model, pretrained, model_config, device, precision, resolution,
                   compile=compile, channels_last=channels_last)  # fmt: skip
    extra: dict[str, object] = {}
    with err_console.status("timing…"):
        if pipeline is not None:
            result = run_pipeline_bench(backend, items, names, batch_size, prompts, rounds,
                                        workers, writers, options)  # fmt: skip
            rows = result.rows
            extra = {"pipeline": {"folder": str(pipeline), "images": result.images,
                                  "peak_rss_mb": {str(result.rss_early_at): round(result.rss_early_mb, 1),
                                                  str(result.images): round(result.rss_end_mb, 1)}}}  # fmt: skip
        elif segment is not None:
            from ..segment import Segmenter

            segmenter = Segmenter(backend, chosen.classes(), names[0], chosen.protocol,
                                  options[names[0]])  # fmt: skip
            result = run_segment_bench(segmenter, items, batch_size, rounds, workers, writers)
            rows = result.rows
            extra = {"segment": {"folder": str(segment), "images": result.images,
                                 "preset": chosen.name, "unit": "window",
                                 "peak_rss_mb": {str(result.rss_early_at): round(result.rss_early_mb, 1),
                                                 str(result.images): round(result.rss_end_mb, 1)}}}  # fmt: skip
        else:
            rows = run_bench(backend, names, batch_size, prompts, rounds, options)
    size = "x".join(map(str, backend.input_size))
    what = "× forward img/s" if pipeline is not None else "× forward"
    if segment is not None:
        what = "× forward windows/s"
    unit = "window" if segment is not None else "image"
    texts = f"{prompts} prompts" if segment is None else f"preset {chosen.name}"
    table = Table(
        title=f"{backend.identity['model']} at {size} on {backend.device}, "
        f"batch {batch_size}, {texts} (median of {rounds}, fastest–slowest)",
        title_justify="left",
    )
    table.add_column("")
    table.add_column(f"ms / {unit}", justify="right")
    table.add_column("range", justify="right")
    table.add_column(what, justify="right")
    table.add_column("range", justify="right")
    table.add_column("")
    for r in rows:
        if r.ratio != r.ratio:
            table.add_row(r.name, r.note, "", "", "", "")
            continue
        table.add_row(
            r.name, f"{r.ms_per_image:.2f}", f"{r.ms_min:.1f}–{r.ms_max:.1f}", f"{r.ratio:.2f}",
            f"{r.ratio_min:.2f}–{r.ratio_max:.2f}",
            f"noisy (spread {r.spread:.0%})" if r.noisy else "",
        )  # fmt: skip
    print_table(table)
    if folder is not None:
        err_console.print(
            f"peak memory: {result.rss_early_mb:.0f} MB after {result.rss_early_at} images, "
            f"{result.rss_end_mb:.0f} MB after {result.images}",
            highlight=False,
        )
    if any(r.noisy for r in rows):
        err_console.print(
            f"some figures spread over more than {NOISY_SPREAD:.0%} between rounds: the machine "
            "was busy; run again when it is idle, or with more --repeats",
            highlight=False,
        )
    if json_path is not None:
        write_json_atomic(
            json_path,
            {**provenance(), "model": backend.identity, "device": str(backend.device),
             "batch_size": batch_size, "prompts": prompts, "repeats": rounds, **extra,
             "rows": [{**asdict(r), "spread": r.spread, "noisy": r.noisy} for r in rows]},
        )  # fmt: skip
