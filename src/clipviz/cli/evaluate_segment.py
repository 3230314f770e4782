"""`clipviz eval ROOT --task segment`: open-vocabulary segmentation scored on a benchmark
split by mmseg's IoUMetric (the settings gathered by `clipviz eval`)."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from ..errors import ClipvizError
from .output import out_console, print_failure, print_table, progress_bar, torchrun_job


@dataclass
class SegmentSettings:
    """The segmentation options of `clipviz eval` (None: the preset's or the default)."""

    preset: str | None = None
    short_side: int | None = None
    window: int | None = None
    stride: int | None = None
    logit_scale: float | None = None
    prob_thd: float | None = None
    area_thd: float | None = None
    pamr: bool | None = None
    pamr_steps: int | None = None
    pamr_dilations: str | None = None
    pamr_compare: bool = False
    reduce_zero_label: bool | None = None


def protocol_of(s: SegmentSettings, method: str) -> tuple[Any, Any]:
    """(preset or None, protocol) from the settings, as `clipviz segment` builds them."""
    from ..segment import Protocol, get_preset
    from ..segment.presets import override
    from .segment import _dilations

    chosen = get_preset(s.preset, method) if s.preset else None
    base = chosen.protocol if chosen is not None else Protocol()
    steps = s.pamr_steps
    if s.pamr is False:
        steps = 0
    elif s.pamr and steps is None and not base.pamr_steps:
        steps = 10
    protocol = override(
        base,
        short_side=s.short_side, window=s.window, stride=s.stride, logit_scale=s.logit_scale,
        prob_thd=s.prob_thd, area_thd=s.area_thd, pamr_steps=steps,
        pamr_dilations=_dilations(s.pamr_dilations),
    )  # fmt: skip
    protocol.check()
    return chosen, protocol


def evaluate_segment(
    root: Path,
    fmt: str,
    settings: SegmentSettings,
    methods: list[str] | None,
    option: list[str] | None,
    split: str | None,
    limit: int | None,
    classes_file: Path | None,
    json_path: Path | None,
    batch_size: int,
    fresh: bool,
    load_args: dict[str, Any],
    quiet: bool,
    report: bool,
) -> None:
    """Score segmentation on a benchmark split: a rows × (mIoU, aAcc, mAcc) table and a JSON."""
    from ..data.datasets.semseg import open_segmentation
    from ..distributed import setup_distributed
    from ..methods import method_options
    from ..runs.eval_results import write_segment_results
    from ..runs.manifest import remove_records
    from ..runs.prepare import check_results_file
    from ..runs.segment_eval import SegmentEvalOptions, evaluate_segmentation
    from ..segment import ClassNames, benchmark_classes, read_classes_file
    from ..segment.presets import preset_options
    from .evaluate import _safe_name
    from .options import load

    dataset = open_segmentation(root, fmt, split, limit, settings.reduce_zero_label)
    if len(dataset) == 0:
        raise ClipvizError(f"{dataset.name} has no images; check --split and the layout")
    chosen_methods = list(dict.fromkeys(m.lower() for m in methods or []))
    chosen, protocol = protocol_of(settings, chosen_methods[0] if chosen_methods else "sclip")
    if not chosen_methods and chosen is not None and chosen.method is None:
        raise ClipvizError(
            f"no clipviz method computes {chosen.name}'s maps; pass --method to use its "
            "settings with one"
        )
    if not chosen_methods:
        chosen_methods = [chosen.method if chosen is not None and chosen.method else "sclip"]
    if classes_file is not None:
        classes = read_classes_file(classes_file)
    elif dataset.class_names is not None:
        classes = ClassNames(tuple((n,) for n in dataset.class_names))
    else:
        classes = benchmark_classes(dataset.benchmark)
    if batch_size < 1:
        raise ClipvizError(f"--batch-size {batch_size} must be at least 1")
    protocols = {}
    if settings.preset and "/" not in settings.preset:  # a benchmark: each method's own preset
        protocols = {m: protocol_of(settings, m)[1] for m in chosen_methods}
    opts = SegmentEvalOptions(
        methods=tuple(chosen_methods),
        protocol=protocol,
        protocols=protocols,
        method_options={
            m: {**preset_options(protocol_of(settings, m)[0], m), **given}
            for m, given in method_options(chosen_methods, option or []).items()
        },
        pamr_compare=settings.pamr_compare,
        batch_size=batch_size,
    )
    to_stdout = json_path == Path("-")
    if json_path is None or to_stdout:
        json_path = Path("clipviz-eval") / f"{_safe_name(dataset.name)}.segment.json"
    check_results_file(json_path)
    records_path = json_path.with_suffix(".records.jsonl")
    dist, device = setup_distributed(load_args.pop("device"))
    quiet = quiet or not dist.main
    if fresh and dist.main:
        remove_records(records_path)
    with torchrun_job(dist):
        backend = load(device=device, **load_args)
        progress = progress_bar("segmenting", quiet, transient=True)
        with progress:
            task = progress.add_task("eval", total=len(dataset))
            results, records = evaluate_segmentation(
                backend, dataset, classes, opts, records_path,
                on_image=lambda r: progress.advance(task), dist=dist,
            )  # fmt: skip
    if not dist.main:
        raise typer.Exit(0)
    failed = [r for r in records if r["status"] == "failed"]
    preset = settings.preset if protocols else (chosen.name if chosen else None)
    write_segment_results(json_path, results, records, backend, dataset, classes, opts,
                          preset)  # fmt: skip
    if report:
        from .report import write_any_report

        page = write_any_report(json_path)
        if not to_stdout and not quiet:
            out_console.print(f"report: {page}", highlight=False)
    if to_stdout:
        sys.stdout.write(json_path.read_text(encoding="utf-8"))
        sys.stdout.flush()
    elif not quiet:
        print_segment_table(results, dataset.name, len(records) - len(failed))
        for r in failed[:20]:
            print_failure(r["image"], r["error"])
        out_console.print(f"results: {json_path}", highlight=False)
    raise typer.Exit(int(bool(failed)))


def print_segment_table(results: dict[str, Any], name: str, scored: int) -> None:
    """Rows × mIoU, aAcc, mAcc, each with its 95 % interval (bootstrap over images)."""
    table = Table(title=f"{name}: {scored} images (95 % intervals: bootstrap over images)",
                  title_justify="left")  # fmt: skip
    table.add_column("method", no_wrap=True)
    for header in ("mIoU %", "aAcc %", "mAcc %"):
        table.add_column(header, justify="right", no_wrap=True)
    for row, res in results.items():
        cells = []
        for key in ("miou", "aacc", "macc"):
            value, ci = res.get(key), res.get(f"{key}_ci")
            text = "—" if value is None else f"{value:.2f}"
            cells.append(text + (f" ({ci[0]:.1f} – {ci[1]:.1f})" if ci else ""))
        table.add_row(row, *cells)
    print_table(table)
