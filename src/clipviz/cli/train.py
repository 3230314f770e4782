"""`clipviz train`: ECLIP finetuning from an image–caption set."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from ..errors import ClipvizError
from .options import (
    CropOpt,
    DebugOpt,
    DeviceOpt,
    MaxPixelsOpt,
    ModelConfigOpt,
    ModelOpt,
    PrecisionOpt,
    PretrainedOpt,
    QuietOpt,
    ResolutionOpt,
    load,
)
from .output import err_console, out_console


def train(
    data: Annotated[
        Path,
        typer.Argument(
            help="image–caption set: CSV/TSV (image,caption), JSONL, COCO captions JSON, "
            "or a folder of images with .txt captions",
            show_default=False,
        ),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="run folder", show_default=False)],
    format: Annotated[
        Literal["auto", "csv", "tsv", "jsonl", "coco", "folder"],
        typer.Option("--format", "-f", help="layout of DATA (auto: by its name)"),
    ] = "auto",
    images: Annotated[
        Path | None,
        typer.Option("--images", help="folder relative image paths point into [default: guessed]"),
    ] = None,
    val_data: Annotated[
        Path | None,
        typer.Option("--val-data", help="held-out set for validation loss and retrieval top-1"),
    ] = None,
    epochs: Annotated[
        int | None, typer.Option("--epochs", help="passes over DATA [default: 1]")
    ] = None,
    steps: Annotated[
        int | None, typer.Option("--steps", help="optimizer steps (instead of --epochs)")
    ] = None,
    batch_size: Annotated[
        int, typer.Option("--batch-size", "-b", help="global contrastive batch")
    ] = 64,
    accum_steps: Annotated[
        int, typer.Option("--accum-steps", help="micro-batches per optimizer step")
    ] = 1,
    lr: Annotated[float, typer.Option("--lr", help="peak learning rate (AdamW)")] = 1e-3,
    weight_decay: Annotated[
        float, typer.Option("--weight-decay", help="AdamW decay of the projection")
    ] = 0.0,
    warmup: Annotated[int, typer.Option("--warmup", help="linear warmup steps")] = 0,
    schedule: Annotated[
        Literal["cosine", "constant"], typer.Option("--schedule", help="lr after warmup")
    ] = "cosine",
    mask_rule: Annotated[
        Literal["mean", "topk", "threshold"],
        typer.Option("--mask-rule", help="free-attention mask: ≥ mean, top-k share, ≥ value"),
    ] = "mean",
    mask_value: Annotated[
        float | None, typer.Option("--mask-value", help="topk share or threshold value")
    ] = None,
    train_ln_post: Annotated[
        bool, typer.Option("--train-ln-post", help="also train a copy of ln_post (ViT)")
    ] = False,
    learnable_scale: Annotated[
        bool, typer.Option("--learnable-scale", help="train the logit scale too")
    ] = False,
    distill: Annotated[
        float, typer.Option("--distill", help="λ of 1 − cos(z, stock image embedding)")
    ] = 0.0,
    seed: Annotated[int, typer.Option("--seed", help="data order")] = 0,
    checkpoint_every: Annotated[
        int, typer.Option("--checkpoint-every", help="steps between checkpoints")
    ] = 500,
    val_every: Annotated[
        int | None,
        typer.Option("--val-every", help="steps between validations [default: checkpoint-every]"),
    ] = None,
    log_every: Annotated[
        int, typer.Option("--log-every", help="steps per metrics.jsonl line")
    ] = 10,
    resume: Annotated[
        bool, typer.Option("--resume", help="continue from RUN_DIR/checkpoint.safetensors")
    ] = False,
    workers: Annotated[
        int | None, typer.Option("--workers", help="image-decoding processes [default: auto]")
    ] = None,
    max_pixels: MaxPixelsOpt = 100_000_000,
    model: ModelOpt = None,
    pretrained: PretrainedOpt = None,
    model_config: ModelConfigOpt = None,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    resolution: ResolutionOpt = None,
    crop: CropOpt = "none",
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Finetune ECLIP's explain projection: `clipviz train captions.csv --out runs/eclip`.

    Run it under `torchrun --nproc_per_node N -m clipviz train …` for several GPUs or
    processes; the result equals one process with the same --batch-size.
    """
    import os

    from ..data.captions import describe_skipped, read_captions
    from ..eclip.config import TrainConfig
    from ..eclip.state import setup_distributed
    from ..eclip.train import train as run_training
    from ..runs.prepare import check_out_folder
    from .output import torchrun_job

    if workers is None:
        workers = min(4, max(0, (os.cpu_count() or 1) - 1))
    config = TrainConfig(
        batch_size=batch_size,
        accum_steps=accum_steps,
        epochs=epochs,
        steps=steps,
        lr=lr,
        weight_decay=weight_decay,
        warmup=warmup,
        schedule=schedule,
        mask_rule=mask_rule,
        mask_value=mask_value,
        train_ln_post=train_ln_post,
        learnable_scale=learnable_scale,
        distill=distill,
        seed=seed,
        workers=workers,
        checkpoint_every=checkpoint_every,
        val_every=val_every,
        log_every=log_every,
        max_pixels=max_pixels,
    )
    check_out_folder(out, "train", overwrite=resume, can_overwrite=False)
    dist, device = setup_distributed(device)
    with torchrun_job(dist):
        show = dist.main and not quiet
        train_set = read_captions(data, format, images)
        val_set = read_captions(val_data, "auto") if val_data is not None else None
        for name, s in (("data", train_set), ("val data", val_set)):
            if s is not None and s.skipped and show:
                err_console.print(
                    f"{name} {s.source}: skipped {describe_skipped(s.skipped)}", highlight=False
                )
        if len(train_set) == 0:
            raise ClipvizError(
                f"{data} has no usable image–caption pairs"
                + (f" (skipped {describe_skipped(train_set.skipped)})" if train_set.skipped else "")
            )
        backend = load(model, pretrained, model_config, device, precision, resolution, crop)
        progress = Progress(
            TextColumn("[bold]training"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=err_console,
            disable=not show,
        )
        task = progress.add_task("train", total=None, loss="—", rate="")

        def on_step(step: int, total: int, info: dict[str, Any]) -> None:
            progress.start()  # only once training runs: setup errors stay one clean line
            progress.update(
                task,
                completed=step,
                total=total,
                loss=f"{info['loss']:.4f}",
                rate=f"{info['images_per_s']:.1f} img/s",
            )

        try:
            result = run_training(
                backend, train_set, out, config, val=val_set, resume=resume, dist=dist,
                on_step=on_step,
            )  # fmt: skip
        finally:
            if progress.live.is_started:
                progress.stop()
    if dist.main and not quiet:
        parts = [f"trained {result.steps} steps"]
        if result.resumed_from:
            parts.append(f"resumed from step {result.resumed_from}")
        if result.last_loss is not None:
            parts.append(f"loss {result.last_loss:.4f}")
        if result.val and "val_top1" in result.val:
            parts.append(
                f"val loss {result.val['val_loss']:.4f}, top-1 {result.val['val_top1']:.3f}"
            )
        if result.unreadable:
            parts.append(f"{result.unreadable} unreadable images skipped")
        out_console.print(
            "; ".join(parts) + f" — explain with --method eclip --eclip {result.final}",
            highlight=False,
        )
