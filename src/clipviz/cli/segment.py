"""`clipviz segment INPUT… --classes-file FILE`: open-vocabulary segmentation of images by the
field's training-free protocol; labels.png and overlay.png per image, with a manifest."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from ..errors import ClipvizError
from .options import (
    DebugOpt,
    DeviceOpt,
    MaxPixelsOpt,
    ModelConfigOpt,
    ModelOpt,
    OptionOpt,
    PrecisionOpt,
    PretrainedOpt,
    QuietOpt,
    load,
)
from .output import err_console, out_console, print_failure

FloatOpt = float | None
IntOpt = int | None


def _dilations(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        return tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise ClipvizError(
            f"`--pamr-dilations` {text!r} is not a list of whole numbers, e.g. 8,16"
        ) from None


def segment(
    inputs: Annotated[
        list[str],
        typer.Argument(help="images, folders or quoted globs", show_default=False),
    ],
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
    save_probs: Annotated[
        bool, typer.Option("--save-probs", help="also write probs.npz per image")
    ] = False,
    alpha: Annotated[float, typer.Option(help="overlay opacity of the labels, 0–1")] = 0.5,
    model: ModelOpt = None,
    pretrained: PretrainedOpt = None,
    model_config: ModelConfigOpt = None,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    max_pixels: MaxPixelsOpt = 100_000_000,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Segment images into the given classes (open-vocabulary semantic segmentation).

    Every class name is scored by a dense method (SCLIP by default) in sliding windows, with
    the protocol of the field's papers: resize to a short side, windows averaged, optional
    PAMR, softmax over all names, the best of each class's synonyms, thresholds. Writes
    OUT/<image>/labels.png (palette PNG of class indices at the original size), overlay.png
    with a legend, optionally probs.npz, and OUT/manifest.jsonl.
    """
    import numpy as np

    from ..data.images import ImageError, load_image
    from ..data.inputs import collect_inputs
    from ..files import append_jsonl, provenance, write_json_atomic
    from ..methods import method_options
    from ..segment import (
        Protocol,
        Segmenter,
        get_preset,
        inline_classes,
        read_classes_file,
    )
    from ..segment.outputs import write_segmentation
    from ..segment.presets import override

    if classes_file is not None and classes is not None:
        raise ClipvizError("give `--classes-file` or `--classes`, not both")
    if not 0 <= alpha <= 1:
        raise ClipvizError(f"`--alpha` {alpha} must be between 0 and 1")
    if batch_size < 1:
        raise ClipvizError(f"`--batch-size` {batch_size} must be at least 1")
    chosen = get_preset(preset, method) if preset else None
    if method is None and chosen is not None and chosen.method is None:
        raise ClipvizError(
            f"no clipviz method computes {chosen.name}'s maps; pass `--method` to use its "
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
        raise ClipvizError(
            "no classes: give `--classes-file FILE`, `--classes a,b,c` or a --preset"
        )
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
    options = method_options([method], list(option or []))[method]
    items, _ = collect_inputs(inputs, recursive=recursive, exclude=[out])
    if not items:
        raise ClipvizError("no images found in the inputs; pass image files or folders")
    backend = load(model, pretrained, model_config, device, precision)
    segmenter = Segmenter(backend, names, method, protocol, options)
    settings: dict[str, Any] = {
        **provenance(),
        "model": backend.identity,
        "method": method,
        "options": options,
        "preset": chosen.name if chosen else None,
        "sources": list(chosen.sources) if chosen else [],
        "protocol": {**protocol.__dict__, "pamr_dilations": list(protocol.pamr_dilations)},
        "classes": [list(line) for line in names.lines],
        "precision": str(backend.autocast_dtype or "fp32"),
    }
    write_json_atomic(out / "run.json", settings)
    manifest, failed, done = out / "manifest.jsonl", 0, 0
    for start in range(0, len(items), batch_size):
        batch, arrays = [], []
        for item in items[start : start + batch_size]:
            try:
                if item.error:
                    raise ImageError(item.error)
                arrays.append(np.asarray(load_image(item.path, max_pixels)))
                batch.append(item)
            except ImageError as e:
                failed += 1
                append_jsonl(manifest, {"input": str(item.path), "status": "failed",
                                        "error": str(e)})  # fmt: skip
                print_failure(str(item.path), e)
        for item, image, result in zip(batch, arrays, segmenter(arrays, save_probs), strict=True):
            record: dict[str, Any] = {"input": str(item.path)}
            if result.labels is None:
                failed += 1
                record.update(status="failed", error=result.error)
                print_failure(str(item.path), result.error)
            else:
                probs = result.probs.numpy() if result.probs is not None else None
                folder = out / item.rel / item.path.name
                files = write_segmentation(folder, image, result.labels, names.labels, probs,
                                           alpha)  # fmt: skip
                done += 1
                present = sorted(set(result.labels.ravel().tolist()))
                record.update(status="ok", files=files, resized=list(result.resized),
                              windows=result.windows, classes=present)  # fmt: skip
            append_jsonl(manifest, record)
        if not quiet:
            err_console.print(f"segmented {done} of {len(items)} images", highlight=False)
    if not quiet:
        out_console.print(json.dumps({"ok": done, "failed": failed, "out": str(out)}))
    if failed:
        raise typer.Exit(1)
