"""`clipviz segment INPUT… --classes-file FILE`: open-vocabulary segmentation of images by the
field's training-free protocol; labels.png and overlay.png per image, with a manifest."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer

from ..errors import ClipvizError
from .explain import run_payload
from .options import (
    DebugOpt,
    DeviceOpt,
    JsonOpt,
    MaxPixelsOpt,
    ModelConfigOpt,
    ModelOpt,
    OptionOpt,
    PrecisionOpt,
    PretrainedOpt,
    ProxyOpt,
    QuietOpt,
    load,
    with_proxy,
)
from .output import (
    out_console,
    print_failure,
    print_json,
    print_table,
    progress_bar,
    torchrun_job,
)

FloatOpt = float | None
IntOpt = int | None


def _dilations(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        return tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise ClipvizError(
            f"--pamr-dilations {text!r} is not a list of whole numbers, e.g. 8,16"
        ) from None


def segment(
    inputs: Annotated[
        list[str] | None,
        typer.Argument(
            help="images, folders, quoted globs or WebDataset shards ('data/{00000..00099}.tar')",
            show_default=False,
        ),
    ] = None,
    inputs_file: Annotated[
        str | None,
        typer.Option("--inputs-file", help="one image path per line ('-' for stdin)"),
    ] = None,
    classes_file: Annotated[
        Path | None,
        typer.Option(
            "--classes-file",
            help="one class per line in label order (line 0: where pixels under --prob-thd "
            "go); synonyms on a line separated by , or ;",
        ),
    ] = None,
    classes: Annotated[
        str | None, typer.Option("--classes", help="inline classes a,b,c (one name each)")
    ] = None,
    preset: Annotated[
        str | None,
        typer.Option(
            "--preset",
            help="a method's settings on a benchmark, e.g. naclip/voc21, or a benchmark "
            "(voc21) for --method's; brings the benchmark's classes unless given",
        ),
    ] = None,
    method: Annotated[
        str | None,
        typer.Option("--method", "-m", help="the dense method (default: sclip, or the preset's)"),
    ] = None,
    option: OptionOpt = None,
    proxy: ProxyOpt = None,
    short_side: Annotated[
        IntOpt, typer.Option("--short-side", help="resize: short side S (0: as is; 336)")
    ] = None,
    window: Annotated[
        IntOpt, typer.Option("--window", help="sliding window in pixels (0: whole image; 224)")
    ] = None,
    stride: Annotated[IntOpt, typer.Option("--stride", help="window stride (112)")] = None,
    logit_scale: Annotated[
        FloatOpt, typer.Option("--logit-scale", help="softmax(L · cos) over all names (40)")
    ] = None,
    prob_thd: Annotated[
        FloatOpt, typer.Option("--prob-thd", help="below this probability: class 0 (0)")
    ] = None,
    area_thd: Annotated[
        FloatOpt,
        typer.Option("--area-thd", help="drop classes with at most this share of foreground (0)"),
    ] = None,
    pamr_on: Annotated[
        bool | None,
        typer.Option("--pamr/--no-pamr", help="PAMR on the cosine maps", show_default=False),
    ] = None,
    pamr_steps: Annotated[IntOpt, typer.Option("--pamr-steps", help="PAMR steps (10)")] = None,
    pamr_dilations: Annotated[
        str | None, typer.Option("--pamr-dilations", help="PAMR dilations (8,16)")
    ] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="output folder")] = Path(
        "clipviz-segment"
    ),
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="images per pass")] = 8,
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
    save_probs: Annotated[
        bool, typer.Option("--save-probs", help="also write probs.npz per image")
    ] = False,
    alpha: Annotated[float, typer.Option(help="overlay opacity of the labels, 0–1")] = 0.5,
    model: ModelOpt = None,
    pretrained: PretrainedOpt = None,
    model_config: ModelConfigOpt = None,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
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
    list_presets: Annotated[
        bool,
        typer.Option(
            "--list-presets", help="list the presets (method/benchmark, settings, sources); exit"
        ),
    ] = False,
    debug: DebugOpt = False,
) -> None:
    """Segment images into the given classes (open-vocabulary semantic segmentation).

    Every class name is scored by a dense method (SCLIP by default) in sliding windows, with
    the protocol of the field's papers: resize to a short side, windows averaged, optional
    PAMR, softmax over all names, the best of each class's synonyms, thresholds. Writes
    OUT/<image>/labels.png (palette PNG of class indices at the original size), overlay.png
    with a legend, optionally probs.npz, and OUT/manifest.jsonl. Re-running skips images
    already done (`--overwrite` to redo); under torchrun every process takes its share.
    """
    from ..data.inputs import collect_inputs
    from ..data.shards import is_shard_spec, shard_paths
    from ..distributed import refuse_stdin, setup_distributed
    from ..methods import method_options
    from ..runs.explain import check_run_args
    from ..runs.prepare import check_out_folder
    from ..runs.segment import SegmentRequest, run_segment, segment_key
    from ..segment import (
        Protocol,
        Segmenter,
        get_preset,
        inline_classes,
        read_classes_file,
    )
    from ..segment.presets import override, preset_options

    if list_presets:
        _print_presets(json_out)
        return
    if classes_file is not None and classes is not None:
        raise ClipvizError("give --classes-file or --classes, not both")
    if not 0 <= alpha <= 1:
        raise ClipvizError(f"--alpha {alpha} must be between 0 and 1")
    if batch_size < 1:
        raise ClipvizError(f"--batch-size {batch_size} must be at least 1")
    chosen = get_preset(preset, method) if preset else None
    if method is None and chosen is not None and chosen.method is None:
        raise ClipvizError(
            f"no clipviz method computes {chosen.name}'s maps; pass --method to use its "
            "settings with one"
        )
    method = (method or (chosen.method if chosen else None) or "sclip").lower()
    if classes_file is not None:
        names = read_classes_file(classes_file)
    elif classes is not None:
        names = inline_classes(classes)
    elif chosen is not None:
        names = chosen.classes()
    else:
        raise ClipvizError("no classes: give --classes-file FILE, --classes a,b,c or a --preset")
    base = chosen.protocol if chosen is not None else Protocol()
    steps = pamr_steps
    if pamr_on is False:
        steps = 0
    elif pamr_on and steps is None and not base.pamr_steps:
        steps = 10
    protocol = override(
        base,
        short_side=short_side, window=window, stride=stride, logit_scale=logit_scale,
        prob_thd=prob_thd, area_thd=area_thd, pamr_steps=steps,
        pamr_dilations=_dilations(pamr_dilations),
    )  # fmt: skip
    protocol.check()
    given = method_options([method], with_proxy(option, proxy))[method]
    options = {**preset_options(chosen, method), **given}
    check_run_args(out, batch_size, workers, max_pixels, writers)
    refuse_stdin(inputs_file)
    if not inputs and inputs_file is None:
        raise ClipvizError("no input given; pass images, folders, globs or --inputs-file")
    shards = inputs_file is None and len(inputs or []) == 1 and is_shard_spec((inputs or [""])[0])
    check_out_folder(out, "segment_shards" if shards else "segment", overwrite)
    shard_files = shard_paths((inputs or [""])[0]) if shards else []
    items, ignored = (
        ([], 0)
        if shards
        else collect_inputs(
            inputs or [], recursive=recursive, inputs_file=inputs_file, exclude=[out]
        )
    )
    if not items and not shard_files:
        raise ClipvizError(
            f"no images found in {', '.join(inputs or []) or inputs_file}; pass image files, a "
            "folder of images (--recursive for its subfolders) or a quoted glob",
        )
    dist, device = setup_distributed(device)
    quiet = quiet or not dist.main
    with torchrun_job(dist):
        backend = load(model, pretrained, model_config, device, precision)
        segmenter = Segmenter(backend, names, method, protocol, options)
        request = SegmentRequest(
            segment_key(segmenter, save_probs, alpha), batch_size, overwrite, workers,
            max_pixels, writers, save_probs, alpha,
        )  # fmt: skip
        fields = {"preset": chosen.name if chosen else None,
                  "sources": list(chosen.sources) if chosen else []}  # fmt: skip
        started = time.perf_counter()
        progress = progress_bar("segmenting", quiet, "rate", transient=True)
        unit = "shard" if shards else "img"
        total = len((shard_files or items)[dist.rank :: dist.world])
        task = progress.add_task("segment", total=total, rate="")

        def on_record(rec: dict[str, Any]) -> None:
            n = progress.tasks[0].completed + 1
            rate = n / max(time.perf_counter() - started, 1e-9)
            progress.update(task, advance=1, rate=f"{rate:.1f} {unit}/s")

        with progress:
            if shards:
                from ..runs.segment_shards import run_segment_shards

                summary = run_segment_shards(
                    segmenter, shard_files, out, request, fields, on_record, dist
                )
            else:
                summary = run_segment(segmenter, items, out, request, fields, on_record, dist)
    if not dist.main:  # rank 0 holds the whole job's summary and carries its exit code
        raise typer.Exit(0)
    for r in summary.records:
        if r["status"] == "failed" and not json_out:
            print_failure(r["input"], r["error"])
    if json_out:
        print_json(run_payload(summary, out, ignored))
    elif not quiet:
        extra = f", {ignored} non-image files ignored" if ignored else ""
        out_console.print(
            f"{summary.ok} ok, {summary.skipped} skipped, {summary.failed} failed{extra} — "
            f"outputs in {out}/, manifest {out / 'manifest.jsonl'}",
            highlight=False,
        )
    raise typer.Exit(summary.exit_code)


def _print_presets(json_out: bool) -> None:
    """Every preset with its settings, the method that computes it and where each value was
    read, as a table (or one JSON object)."""
    from rich.table import Table

    from ..segment import get_preset, preset_names

    presets = [get_preset(name) for name in preset_names()]
    if json_out:
        print_json({"presets": [
            {"name": p.name, "method": p.method, "benchmark": p.benchmark,
             "protocol": {**p.protocol.__dict__, "pamr_dilations": list(p.protocol.pamr_dilations)},
             "options": p.options, "sources": list(p.sources), "note": p.note}
            for p in presets
        ]})  # fmt: skip
        return
    table = Table("preset", "method", "short side", "window / stride", "logit scale",
                  "prob_thd", "area_thd", "PAMR", "source", title="clipviz segment --preset")  # fmt: skip
    for p in presets:
        s = p.protocol
        windows = "whole image" if s.window == 0 else f"{s.window} / {s.stride}"
        pamr = (
            f"{s.pamr_steps} steps, {','.join(map(str, s.pamr_dilations))}"
            if s.pamr_steps
            else "off"
        )
        table.add_row(p.name, p.method or "— (choose --method)", str(s.short_side), windows,
                      f"{s.logit_scale:g}", f"{s.prob_thd:g}", f"{s.area_thd:g}", pamr,
                      p.sources[-1] if p.sources else "")  # fmt: skip
    print_table(table)
