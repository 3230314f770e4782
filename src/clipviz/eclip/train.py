"""ECLIP training: the explain head learns masked-max-pooled image embeddings that match the
frozen text embeddings of the captions (docs/eclip.md says how to run it; the model part in
`methods/eclip.py`).

Run directory::

    RUN/run.json                 kind `train`, options, base model, data summary (at the start)
    RUN/metrics.jsonl            one line per logged step (loss, lr, images/s) and validation
    RUN/checkpoint.safetensors   the latest training state (every --checkpoint-every steps)
    RUN/eclip.safetensors        the final head, for `--method eclip --eclip RUN/eclip.safetensors`

Checkpoints are safetensors only (nothing is unpickled on load): `head.<name>` trained
tensors, `train.logit_scale` (log of the scale), `train.step`, `optim.<param>.<key>` AdamW
state, `rng.torch`/`rng.cuda` generator states (uint8); metadata `base` (the base model's
identity), `config` (every option that shapes the result), `format`, `kind`, `step`.

Determinism: the data order is a pure function of (seed, epoch), the learning rate of
(step, total steps), and a checkpoint holds the rest of the state, so `--resume` after a
kill continues on the same micro-batches with the same optimizer state and ends with the
same weights as an uninterrupted run. Text embeddings are computed in fixed chunks of
caption ids so that no batch composition can change their rounding.

Distributed (`torchrun --nproc_per_node N -m clipviz train …`): every rank takes its shard of
every global micro-batch, computes `z` for its images, and all-gathers `z`, the text and
stock embeddings and the caption ids without gradient, putting its own slice back with
gradient (open_clip's `gather_features`, `gather_with_grad=False`). Every rank then
computes the loss of the whole global batch, but its backward only reaches the head through
its own slice, so the true gradient is the SUM of the ranks' gradients (DDP's average would
be the gradient divided by N). The learnable logit scale is used by every rank's full loss
and already has the whole gradient everywhere, so it is averaged instead. The result equals
one process with the same global batch, up to float rounding.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as torch_dist
from torch import nn

from ..backend import Backend
from ..data.captions import CaptionImages, CaptionSet, as_list
from ..errors import ClipvizError
from ..files import append_jsonl, write_text_atomic
from ..runs.prepare import prepare_run
from .config import NOT_COMPARED, RUNTIME_FIELDS, TrainConfig, TrainResult, check_options
from .head import ExplainHead, base_identity
from .objective import TextBank, micro_step, validate
from .schedule import GlobalBatches, learning_rate
from .state import Dist, load_checkpoint, reduce_gradients, save_checkpoint, trim_metrics

CHECKPOINT = "checkpoint.safetensors"
FINAL = "eclip.safetensors"
METRICS = "metrics.jsonl"
MAX_LOGIT_SCALE = 100.0


def _run_config(config: TrainConfig, backend: Backend, data: CaptionSet, total: int) -> dict:
    return {
        **{k: v for k, v in asdict(config).items() if k not in RUNTIME_FIELDS},
        "total_steps": total,
        "resolution": backend.identity.get("resolution"),
        "crop": backend.preprocess.crop,
        "data": data.digest(),
        "pairs": len(data),
    }


def train(
    backend: Backend,
    data: CaptionSet,
    out: str | Path,
    config: TrainConfig | None = None,
    *,
    val: CaptionSet | None = None,
    resume: bool = False,
    dist: Dist | None = None,
    on_step: Callable[[int, int, dict[str, float]], None] | None = None,
) -> TrainResult:
    """Train ECLIP's explain head on `data`, writing checkpoints and logs into `out`.

    resume: continue from `out/checkpoint.safetensors` (same data and options required).
    on_step: called on rank 0 after every optimizer step with (step, total, loss/images/s).
    """
    config, d, out = config or TrainConfig(), dist or Dist(), Path(out)
    check_options(config, backend, d, len(data))
    A, dev = config.accum_steps, backend.device
    micro_per_epoch = len(data) // config.batch_size
    total = config.steps or (config.epochs or 1) * (micro_per_epoch // A)

    head = ExplainHead(backend, config.train_ln_post).to(dev)
    log_scale = nn.Parameter(
        backend.model.logit_scale.detach().float().clone().reshape(()),
        requires_grad=config.learnable_scale,
    )
    head_params = [(f"head.{k}", p) for k, p in head.named_parameters()]
    decay = [(k, p) for k, p in head_params if p.ndim >= 2]  # not biases or LayerNorm gains
    other = [(k, p) for k, p in head_params if p.ndim < 2]
    if config.learnable_scale:
        other.append(("logit_scale", log_scale))
    named = decay + other  # the optimizer's parameter order
    groups = [{"params": [p for _, p in decay], "weight_decay": config.weight_decay}]
    if other:
        groups.append({"params": [p for _, p in other], "weight_decay": 0.0})
    optimizer = torch.optim.AdamW(groups, lr=config.lr)

    run_config = _run_config(config, backend, data, total)
    meta = {
        "base": json.dumps(base_identity(backend), sort_keys=True),
        "config": json.dumps(run_config, sort_keys=True),
    }
    checkpoint, metrics = out / CHECKPOINT, out / METRICS
    step = 0
    if resume:
        if not checkpoint.is_file():
            raise ClipvizError(f"nothing to resume: {checkpoint} does not exist; drop `resume`")
        step = load_checkpoint(
            checkpoint, backend, head, log_scale, optimizer, named, run_config, NOT_COMPARED
        )
    elif checkpoint.exists() or (out / FINAL).exists():
        raise ClipvizError(
            f"{out} already holds a training run; pass `resume` to continue it, "
            "or choose another `out`"
        )
    fields = {
        "base": base_identity(backend),
        "config": run_config,
        "runtime": {k: getattr(config, k) for k in sorted(RUNTIME_FIELDS)},
        "world_size": d.world,
        "data": {"source": str(data.source), "format": data.format, "pairs": len(data),
                 "captions": len(data.unique_captions), "skipped": dict(data.skipped)},
        "val_data": str(val.source) if val is not None else None,
        "resumed_from": step if resume else None,
    }  # fmt: skip
    # the ranks meet in the steps' collectives, so a rank that fails there cannot also wait
    # for the others at the end: torchrun stops the job
    with prepare_run(out, "train", fields, overwrite=resume, can_overwrite=False, dist=d,
                     end_together=False):  # fmt: skip
        if d.main:
            if resume:
                trim_metrics(metrics, step)
            else:
                write_text_atomic(metrics, "")

        loader = torch.utils.data.DataLoader(
            CaptionImages(data.images, backend.preprocess, config.max_pixels),
            batch_sampler=GlobalBatches(
                len(data), config.batch_size, config.seed, step * A, total * A, d
            ),
            num_workers=config.workers,
            collate_fn=as_list,
        )
        bank = TextBank(backend, data.unique_captions)
        val_bank = TextBank(backend, val.unique_captions) if val is not None else None
        val_every = config.val_every or config.checkpoint_every
        unreadable = torch.zeros(len(data), dtype=torch.int32)
        resumed_from, last_loss, val_result = step, None, None
        window: list[float] = []
        window_images, window_start = 0, time.perf_counter()

        def scale() -> torch.Tensor | float:
            if config.learnable_scale:
                return log_scale.exp().clamp(max=MAX_LOGIT_SCALE)
            return backend.logit_scale

        def scale_value() -> float:
            with torch.no_grad():
                return float(scale())

        batches = iter(loader)
        while step < total:
            started = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            losses, images = [], 0
            for _ in range(A):
                micro = micro_step(
                    backend, head, scale(), next(batches), data.caption_ids, bank, config, d
                )
                unreadable[micro.failed] = 1
                if micro.loss is not None:
                    if micro.loss.requires_grad:
                        (micro.loss / A).backward()
                    losses.append(float(micro.loss.detach()))
                    images += micro.images
            if images:  # the same on every rank: counted on the gathered batch
                reduce_gradients(
                    [p for _, p in head_params], log_scale if config.learnable_scale else None, d
                )
                lr = learning_rate(step, total, config)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                optimizer.step()
            step += 1
            if not d.main:
                continue
            last_loss = sum(losses) / len(losses) if losses else None
            window += losses
            window_images += images
            if on_step is not None:
                seconds = max(time.perf_counter() - started, 1e-9)
                on_step(
                    step, total, {"loss": last_loss or math.nan, "images_per_s": images / seconds}
                )
            if step % config.log_every == 0 or step == total:
                now = time.perf_counter()
                append_jsonl(
                    metrics,
                    {
                        "step": step,
                        "epoch": round(step * A / micro_per_epoch, 4),
                        "loss": sum(window) / len(window) if window else None,
                        "lr": learning_rate(step - 1, total, config),
                        "images_per_s": round(window_images / max(now - window_start, 1e-9), 2),
                        "logit_scale": scale_value(),
                        "unreadable": int(unreadable.sum()),
                    },
                )
                window, window_images, window_start = [], 0, now
            if (
                val is not None
                and val_bank is not None
                and (step % val_every == 0 or step == total)
            ):
                val_result = validate(backend, head, val, val_bank, config, scale_value())
                append_jsonl(metrics, {"step": step, **val_result})
            if step % config.checkpoint_every == 0 or step == total:
                save_checkpoint(checkpoint, head, log_scale, step, meta, optimizer, named)

        if d.world > 1:
            torch_dist.all_reduce(unreadable, op=torch_dist.ReduceOp.MAX)
        if d.main:
            save_checkpoint(out / FINAL, head, log_scale, step, meta)
            append_jsonl(
                metrics,
                {"step": step, "event": "end", "unreadable": int(unreadable.sum()),
                 "skipped": dict(data.skipped)},
            )  # fmt: skip
        if d.world > 1:
            torch_dist.barrier()
        return TrainResult(
            step, out / FINAL, resumed_from, last_loss, val_result, int(unreadable.sum())
        )
