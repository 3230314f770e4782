"""`clipviz eval DATASET`: score methods on a dataset with masks or boxes."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from rich.table import Table

from ..errors import ClipvizError
from .coco_object import coco_object as coco_object  # registered beside eval
from .options import (
    ChannelsLastOpt,
    CompileOpt,
    CropOpt,
    DebugOpt,
    DeviceOpt,
    EclipOpt,
    GaeStartOpt,
    GscorecamTopkOpt,
    LegradLayersOpt,
    MethodOpt,
    ModelConfigOpt,
    ModelOpt,
    OptionOpt,
    PrecisionOpt,
    PretrainedOpt,
    ProxyOpt,
    QuietOpt,
    ReportOpt,
    ResolutionOpt,
    SurgeryDepthOpt,
    TableFormatOpt,
    chosen_methods,
    gather_method_options,
    load,
    with_proxy,
)
from .output import (
    out_console,
    print_failure,
    print_table,
    progress_bar,
    set_table_format,
    torchrun_job,
)

COLUMNS = {  # metric -> (result key, header, decimals)
    "miou": [("miou", "mIoU %", 1), ("miou_threshold", "τ", 2)],
    "msc": [("msc", "mSC %", 1)],
    "pointing": [("pointing", "pointing", 3), ("area", "area", 3)],
    "energy": [("energy", "energy", 3)],
    "maxboxacc": [("maxboxacc", "MaxBoxAcc %", 1), ("maxboxacc_threshold", "τ box", 2)],
    "deletion": [("deletion", "deletion ↓", 3)],
    "insertion": [("insertion", "insertion ↑", 3)],
}


def evaluate(
    root: Annotated[
        Path, typer.Argument(help="dataset root (or a COCO instances JSON)", show_default=False)
    ],
    format: Annotated[
        Literal[
            "voc",
            "coco",
            "cub",
            "generic",
            "context",
            "coco-stuff",
            "coco-object",
            "cityscapes",
            "ade",
        ],
        typer.Option(
            "--format",
            "-f",
            help="layout: voc, coco, cub, generic (maps); voc, context, coco-stuff, "
            "coco-object, cityscapes, ade (--task segment)",
        ),
    ] = "voc",  # fmt: skip
    eval_task: Annotated[
        Literal["maps", "segment"],
        typer.Option(
            "--task",
            help="maps: score saliency maps per class; segment: open-vocabulary segmentation "
            "by the field's protocol, scored by mIoU, aAcc, mAcc over the split",
        ),
    ] = "maps",
    method: MethodOpt = None,
    option: OptionOpt = None,
    proxy: ProxyOpt = None,
    metric: Annotated[
        list[str] | None,
        typer.Option(
            "--metric",
            help="miou, msc, pointing, energy, maxboxacc, deletion, insertion "
            "(default: those the layout supports, without deletion/insertion)",
            show_default=False,
        ),
    ] = None,
    split: Annotated[
        str | None,
        typer.Option(help="split name (default: voc val, coco val2017)", show_default=False),
    ] = None,
    limit: Annotated[
        int | None, typer.Option(help="score the first N images only", show_default=False)
    ] = None,
    tune_split: Annotated[
        str | None,
        typer.Option(
            "--tune-split",
            help="choose mIoU's and MaxBoxAcc's thresholds on this split (e.g. train), not on "
            "the images scored",
            show_default=False,
        ),
    ] = None,
    classes_file: Annotated[
        Path | None,
        typer.Option(
            "--classes-file",
            help="'class: prompt' lines; --task segment: one class per line in label order, "
            "synonyms separated by , or ; (default: the benchmark's)",
        ),
    ] = None,
    json_path: Annotated[
        Path | None,
        typer.Option(
            "--json",
            help="results JSON (default: clipviz-eval/<dataset>.json, with --task segment "
            "<dataset>.segment.json); '-' prints it on stdout (tables off) and keeps the file at "
            "the default place",
            show_default=False,
        ),
    ] = None,
    pointing_tolerance: Annotated[
        float, typer.Option("--pointing-tolerance", help="pixels (15 for ~500 px photos)")
    ] = 15.0,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="images per pass")] = 16,
    no_ensemble: Annotated[
        bool, typer.Option("--no-ensemble", help="embed prompts as given, without templates")
    ] = False,
    fresh: Annotated[bool, typer.Option("--fresh", help="ignore records of earlier runs")] = False,
    model: ModelOpt = None,
    pretrained: PretrainedOpt = None,
    model_config: ModelConfigOpt = None,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    resolution: ResolutionOpt = None,
    compile: CompileOpt = False,
    channels_last: ChannelsLastOpt = None,
    crop: CropOpt = "none",
    quiet: QuietOpt = False,
    report: ReportOpt = False,
    table_format: TableFormatOpt = "table",
    surgery_depth: SurgeryDepthOpt = None,
    gae_start_layer: GaeStartOpt = None,
    legrad_layers: LegradLayersOpt = None,
    gscorecam_topk: GscorecamTopkOpt = None,
    eclip: EclipOpt = None,
    synset: Annotated[
        list[str] | None,
        typer.Option(
            "--synset",
            help="convis: the WordNet synset of each class, in class order (= -O convis.synsets)",
            show_default=False,
        ),
    ] = None,
    preset: Annotated[
        str | None,
        typer.Option(
            "--preset",
            help="segment: a method's settings on a benchmark, e.g. naclip/voc21",
            show_default=False,
        ),
    ] = None,
    short_side: Annotated[
        int | None, typer.Option("--short-side", help="segment: resize to short side S (336)")
    ] = None,
    window: Annotated[
        int | None, typer.Option("--window", help="segment: sliding window (0: whole; 224)")
    ] = None,
    stride: Annotated[int | None, typer.Option("--stride", help="segment: stride (112)")] = None,
    logit_scale: Annotated[
        float | None, typer.Option("--logit-scale", help="segment: softmax(L · cos) (40)")
    ] = None,
    prob_thd: Annotated[
        float | None, typer.Option("--prob-thd", help="segment: below it, class 0 (0)")
    ] = None,
    area_thd: Annotated[
        float | None, typer.Option("--area-thd", help="segment: area threshold (0)")
    ] = None,
    pamr_on: Annotated[
        bool | None,
        typer.Option(
            "--pamr/--no-pamr", help="segment: PAMR on the cosine maps", show_default=False
        ),
    ] = None,
    pamr_steps: Annotated[
        int | None, typer.Option("--pamr-steps", help="segment: PAMR steps (10)")
    ] = None,
    pamr_dilations: Annotated[
        str | None, typer.Option("--pamr-dilations", help="segment: PAMR dilations (8,16)")
    ] = None,
    pamr_compare: Annotated[
        bool,
        typer.Option(
            "--pamr-compare",
            help="segment: score each method without and with PAMR (rows METHOD and METHOD+pamr)",
        ),
    ] = False,
    reduce_zero_label: Annotated[
        bool | None,
        typer.Option(
            "--reduce-zero-label/--keep-zero-label",
            help="segment: label 0 ignored, the others one lower (VOC20, PC59; ADE by default)",
            show_default=False,
        ),
    ] = None,
    debug: DebugOpt = False,
) -> None:
    """Score methods on a dataset with masks or boxes: a methods × metrics table and a JSON.

    With `--task segment`: segment each image into the benchmark's classes by the field's
    protocol and score the split by mIoU, aAcc and mAcc (mmseg's IoUMetric)."""
    option = with_proxy(option, proxy)
    if eval_task == "segment":
        from .evaluate_segment import SegmentSettings, evaluate_segment

        maps_only = {"metric": metric, "tune-split": tune_split, "synset": synset,
                     "eclip": eclip, "no-ensemble": no_ensemble or None}  # fmt: skip
        if given := [k for k, v in maps_only.items() if v is not None]:
            raise ClipvizError(
                f"--{given[0]} scores saliency maps, not --task segment (which scores "
                "mIoU, aAcc and mAcc); drop it"
            )

        set_table_format(table_format)
        settings = SegmentSettings(
            preset, short_side, window, stride, logit_scale, prob_thd, area_thd, pamr_on,
            pamr_steps, pamr_dilations, pamr_compare, reduce_zero_label,
        )  # fmt: skip
        load_args = {"model": model, "pretrained": pretrained, "model_config": model_config,
                     "device": device, "precision": precision}  # fmt: skip
        evaluate_segment(root, format, settings, method, option, split, limit, classes_file,
                         json_path, batch_size, fresh, load_args, quiet, report)  # fmt: skip
    segment_only = {"preset": preset, "short-side": short_side, "window": window,
                    "stride": stride, "logit-scale": logit_scale, "prob-thd": prob_thd,
                    "area-thd": area_thd, "pamr": pamr_on, "pamr-steps": pamr_steps,
                    "pamr-dilations": pamr_dilations, "pamr-compare": pamr_compare or None,
                    "reduce-zero-label": reduce_zero_label}  # fmt: skip
    if given := [k for k, v in segment_only.items() if v is not None]:
        raise ClipvizError(f"--{given[0]} is a segmentation setting; add --task segment")
    if format not in ("voc", "coco", "cub", "generic"):
        raise ClipvizError(
            f"layout {format} is a segmentation benchmark; add --task segment (maps are "
            "scored on voc, coco, cub or generic)"
        )
    from ..data.datasets import open_dataset
    from ..distributed import broadcast, setup_distributed
    from ..runs.eval_results import tuned_thresholds, write_report
    from ..runs.evaluate import EvalOptions, check_metrics, class_prompts, default_metrics
    from ..runs.evaluate import evaluate as run_eval
    from ..runs.manifest import remove_records
    from ..runs.prepare import check_results_file

    set_table_format(table_format)
    methods = tuple(chosen_methods(method, eclip))
    options = gather_method_options(
        list(methods), option, surgery_depth, gae_start_layer, legrad_layers, gscorecam_topk,
        eclip, {"convis.synsets": list(synset)} if synset else None,
    )  # fmt: skip
    dataset = open_dataset(root, format, split=split, limit=limit)
    if len(dataset) == 0:
        raise ClipvizError(f"{dataset.name} has no images; check --split and the layout")
    opts = EvalOptions(
        methods=methods,
        metrics=tuple(dict.fromkeys(metric or default_metrics(dataset))),
        pointing_tolerance=pointing_tolerance,
        batch_size=batch_size,
        method_options=options,
    )
    check_metrics(opts.metrics, dataset)
    prompts = class_prompts(dataset, classes_file)
    to_stdout = json_path == Path("-")
    if json_path is None or to_stdout:
        json_path = Path("clipviz-eval") / f"{_safe_name(dataset.name)}.json"
    check_results_file(json_path)
    records_path = json_path.with_suffix(".records.jsonl")
    dist, device = setup_distributed(device)
    quiet = quiet or not dist.main
    if fresh and dist.main:
        remove_records(records_path)

    tune = None
    if tune_split is not None:
        tune = open_dataset(root, format, split=tune_split, limit=limit)
        if tune.name == dataset.name:
            raise ClipvizError(
                f"--tune-split {tune_split} is the split being scored; choose another split"
            )
        if len(tune) == 0:
            raise ClipvizError(f"{tune.name} has no images; check --tune-split and the layout")
        if tune.classes != dataset.classes:
            raise ClipvizError(
                f"{tune.name} and {dataset.name} have different classes; tune on a split of "
                "the same dataset"
            )
    with torchrun_job(dist):
        backend = load(model, pretrained, model_config, device, precision, resolution, crop,
                       compile=compile, channels_last=channels_last)  # fmt: skip
        texts = backend.encode_texts(prompts, ensemble=not no_ensemble)
        progress = progress_bar("evaluating", quiet, transient=True)
        tuning = None
        with progress:
            if tune is not None:
                tune_path = json_path.with_suffix(".tune.records.jsonl")
                if fresh and dist.main:
                    remove_records(tune_path)
                task = progress.add_task("tune", total=len(tune))
                tuned_results, tuned_records = run_eval(
                    backend, tune, texts, opts, tune_path,
                    on_image=lambda r: progress.advance(task), dist=dist,
                )  # fmt: skip
                if dist.main:
                    tuning = {
                        "split": tune.name,
                        "images": sum(r["status"] == "ok" for r in tuned_records),
                        "thresholds": tuned_thresholds(tuned_results),
                    }
                tuning = broadcast(tuning, dist)
            task = progress.add_task("eval", total=len(dataset))
            results, records = run_eval(
                backend, dataset, texts, opts, records_path,
                on_image=lambda r: progress.advance(task),
                fixed=tuning["thresholds"] if tuning else None, dist=dist,
            )  # fmt: skip
    if not dist.main:  # rank 0 holds every rank's records and carries the exit code
        raise typer.Exit(0)
    exit_code = int(any(r["status"] == "failed" for r in records))
    csv_path = write_report(json_path, results, records, backend, dataset, texts, opts, tuning)
    failed = [r for r in records if r["status"] == "failed"]
    if report:
        from .report import write_any_report

        page = write_any_report(json_path)
        if not to_stdout and not quiet:
            out_console.print(f"report: {page}", highlight=False)
    if to_stdout:
        sys.stdout.write(json_path.read_text(encoding="utf-8"))
        sys.stdout.flush()
    elif not quiet:
        print_eval_table(results, opts.metrics, dataset.name, len(records) - len(failed))
        if {"miou", "maxboxacc"} & set(opts.metrics):
            where = (
                f"{tuning['split']} ({tuning['images']} images)"
                if tuning
                else "the scored images themselves (--tune-split chooses them on another split)"
            )
            out_console.print(f"thresholds τ chosen on {where}", highlight=False)
        for r in failed[:20]:
            print_failure(r["image"], r["error"])
        out_console.print(f"results: {json_path}, per image: {csv_path}", highlight=False)
    raise typer.Exit(exit_code)


def _safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name).strip("_") or "dataset"


def print_eval_table(results: dict[str, Any], metrics: Any, name: str, scored: int) -> None:
    """The methods × metrics table, then the metrics' 95 % intervals (bootstrap over images)."""
    columns = [c for m in metrics for c in COLUMNS[m]]
    table = Table(title=f"{name}: {scored} images", title_justify="left")
    intervals = Table(
        title="95 % intervals (bootstrap over images, threshold search included)",
        title_justify="left",
    )
    for t in (table, intervals):
        t.add_column("method", no_wrap=True)
    for key, header, _ in columns:
        table.add_column(header, justify="right", no_wrap=True)
        if key in metrics:
            intervals.add_column(header, justify="right", no_wrap=True)
    any_ci = False
    for method, res in results.items():
        cells, spans = [], []
        for key, _, digits in columns:
            value, ci = res.get(key), res.get(f"{key}_ci")
            cells.append("—" if value is None or value != value else f"{value:.{digits}f}")
            if key in metrics:
                spans.append(f"{ci[0]:.{digits}f} – {ci[1]:.{digits}f}" if ci else "—")
                any_ci = any_ci or bool(ci)
        table.add_row(method, *cells)
        intervals.add_row(method, *spans)
    print_table(table)
    if any_ci:
        print_table(intervals)
