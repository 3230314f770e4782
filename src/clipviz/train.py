"""ECLIP training: the explain head learns masked-max-pooled image embeddings that match the
frozen text embeddings of the captions (METHODS.md, ECLIP; model part in `methods/eclip.py`).

Run directory::

    RUN/run.json                 options, base model, data summary (written at the start)
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
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.distributed as torch_dist
import torch.nn.functional as F
from torch import nn

from .backend import Backend
from .captions import CaptionImages, CaptionSet, as_list, describe_skipped
from .data import DEFAULT_MAX_PIXELS
from .errors import ClipvizError
from .files import append_jsonl, write_json_atomic, write_text_atomic
from .losses import contrastive_loss
from .methods.eclip import (
    ExplainHead,
    MaskRule,
    base_identity,
    free_attention_mask,
    frozen_features,
    masked_max_pool,
)
from .train_state import (
    Dist,
    cleanup_distributed,
    gather,
    load_checkpoint,
    reduce_gradients,
    save_checkpoint,
    setup_distributed,
    trim_metrics,
)

CHECKPOINT = "checkpoint.safetensors"
FINAL = "eclip.safetensors"
METRICS = "metrics.jsonl"
TEXT_CHUNK = 256
MAX_LOGIT_SCALE = 100.0


@dataclass(frozen=True)
class TrainConfig:
    """ECLIP training options.

    batch_size: the global contrastive batch of one micro-step, over all processes (the
        negatives of the loss); one optimizer step averages the gradients of `accum_steps`
        such micro-batches (more images per step, not more negatives).
    steps: optimizer steps in all; else `epochs` (default 1) passes over the data.
    """

    batch_size: int = 64
    accum_steps: int = 1
    epochs: int | None = None
    steps: int | None = None
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup: int = 0
    schedule: Literal["cosine", "constant"] = "cosine"
    mask_rule: MaskRule = "mean"
    mask_value: float | None = None
    train_ln_post: bool = False
    learnable_scale: bool = False
    distill: float = 0.0
    seed: int = 0
    # how the run is carried out, not what it computes (may change on --resume)
    workers: int = 0
    checkpoint_every: int = 500
    val_every: int | None = None
    log_every: int = 10
    max_pixels: int = DEFAULT_MAX_PIXELS


RUNTIME_FIELDS = frozenset({"workers", "checkpoint_every", "val_every", "log_every", "max_pixels"})
# epochs/steps are compared through the total step count they give
NOT_COMPARED = RUNTIME_FIELDS | {"epochs", "steps"}


@dataclass
class TrainResult:
    steps: int
    final: Path
    resumed_from: int
    last_loss: float | None
    val: dict[str, float] | None
    unreadable: int


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The sample order of `epoch`: a permutation that depends only on (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(n)


class GlobalBatches(torch.utils.data.Sampler[list[int]]):
    """This rank's share of global micro-batches `start`…`stop` (incomplete last batches of an
    epoch are dropped, so every batch has the same size on every rank)."""

    def __init__(self, n: int, batch_size: int, seed: int, start: int, stop: int, d: Dist):
        self.n, self.batch_size, self.seed, self.start, self.stop, self.d = (
            n, batch_size, seed, start, stop, d,
        )  # fmt: skip
        self.per_epoch = n // batch_size
        self.local = batch_size // d.world

    def __len__(self) -> int:
        return self.stop - self.start

    def __iter__(self) -> Iterator[list[int]]:
        order, current = None, -1
        for m in range(self.start, self.stop):
            epoch, j = divmod(m, self.per_epoch)
            if epoch != current:
                order, current = epoch_order(self.n, self.seed, epoch), epoch
            assert order is not None
            batch = order[j * self.batch_size : (j + 1) * self.batch_size]
            yield batch[self.d.rank * self.local : (self.d.rank + 1) * self.local].tolist()


def learning_rate(step: int, total: int, config: TrainConfig) -> float:
    """The lr of optimizer step `step` (0-based): linear warmup, then cosine to 0 or constant."""
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    if config.schedule == "constant":
        return config.lr
    progress = (step - config.warmup) / max(1, total - config.warmup)
    return 0.5 * config.lr * (1.0 + math.cos(math.pi * progress))


class TextBank:
    """Frozen text embeddings of a set's unique captions, computed on first use in fixed
    chunks of caption ids (the same chunks in every run and on every rank)."""

    def __init__(self, backend: Backend, captions: Sequence[str]) -> None:
        self.backend, self.captions = backend, captions
        self.chunks: dict[int, torch.Tensor] = {}

    @torch.no_grad()
    def _encode(self, chunk: int) -> torch.Tensor:
        b = self.backend
        tokens = b.tokenizer(list(self.captions[chunk * TEXT_CHUNK : (chunk + 1) * TEXT_CHUNK]))
        with b.autocast():
            emb = b.model.encode_text(tokens.to(b.device))
        return F.normalize(emb.float(), dim=-1)

    def __call__(self, ids: Sequence[int]) -> torch.Tensor:
        """Unit-length embeddings `[len(ids), D]` on the model's device (`ids` not empty)."""
        for chunk in sorted({i // TEXT_CHUNK for i in ids} - self.chunks.keys()):
            self.chunks[chunk] = self._encode(chunk)
        return torch.stack([self.chunks[i // TEXT_CHUNK][i % TEXT_CHUNK] for i in ids])


# -- one micro-step ----------------------------------------------------------------------


def pooled_embeddings(
    backend: Backend, head: ExplainHead, images: torch.Tensor, config: TrainConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """`z` (masked max pooling of the explain features) `[B, D]` and the stock image embedding."""
    feats = frozen_features(backend, images)
    mask = free_attention_mask(feats.free_attention, config.mask_rule, config.mask_value)
    return masked_max_pool(head.features(feats.tokens), mask), feats.stock_embedding


def eclip_loss(
    z: torch.Tensor,
    text: torch.Tensor,
    stock: torch.Tensor,
    caption_ids: torch.Tensor,
    scale: torch.Tensor | float,
    distill: float,
) -> torch.Tensor:
    """Contrastive loss of `z` against the captions, plus `distill·(1 − cos(z, stock))`."""
    loss = contrastive_loss(z, text, scale, caption_ids)
    if distill:
        loss = loss + distill * (1.0 - (z * stock).sum(dim=-1)).mean()
    return loss


@dataclass
class _Micro:
    loss: torch.Tensor | None
    images: int  # valid images in the global batch
    failed: list[int]  # local dataset indices that could not be decoded


def _micro_step(
    backend: Backend,
    head: ExplainHead,
    scale: torch.Tensor | float,
    batch: list[tuple[int, torch.Tensor | None, str | None]],
    caption_ids: Sequence[int],
    bank: TextBank,
    config: TrainConfig,
    d: Dist,
) -> _Micro:
    """The global batch's loss on this rank (bad images dropped, the rest padded to a fixed
    local size so every rank gathers tensors of one shape)."""
    good = [(i, x) for i, x, err in batch if err is None and x is not None]
    failed = [i for i, x, err in batch if err is not None or x is None]
    local, dev = config.batch_size // d.world, backend.device
    dim = head.proj.shape[1]
    ids = [caption_ids[i] for i, _ in good]
    if good:
        z, stock = pooled_embeddings(backend, head, torch.stack([x for _, x in good]), config)
        text = bank(ids)
    else:
        z = stock = text = torch.zeros(0, dim, device=dev)
    pad = local - len(good)
    z = torch.cat([z, z.new_zeros(pad, dim)])
    text = torch.cat([text, text.new_zeros(pad, dim)])
    stock = torch.cat([stock, stock.new_zeros(pad, dim)])
    id_tensor = torch.tensor(ids + [-1] * pad, device=dev, dtype=torch.long)
    z, text, stock, id_tensor = (gather(t, d) for t in (z, text, stock, id_tensor))
    keep = id_tensor >= 0
    n = int(keep.sum())
    if n == 0:
        return _Micro(None, 0, failed)
    loss = eclip_loss(z[keep], text[keep], stock[keep], id_tensor[keep], scale, config.distill)
    return _Micro(loss, n, failed)


# -- checkpoints -------------------------------------------------------------------------


def _run_config(config: TrainConfig, backend: Backend, data: CaptionSet, total: int) -> dict:
    return {
        **{k: v for k, v in asdict(config).items() if k not in RUNTIME_FIELDS},
        "total_steps": total,
        "resolution": backend.identity.get("resolution"),
        "crop": backend.preprocess.crop,
        "data": data.digest(),
        "pairs": len(data),
    }


@torch.no_grad()
def validate(
    backend: Backend,
    head: ExplainHead,
    val: CaptionSet,
    bank: TextBank,
    config: TrainConfig,
    scale: float,
) -> dict[str, float]:
    """Held-out contrastive loss (in batches of `batch_size`, file order) and image→text
    retrieval top-1 over the set's distinct captions."""
    loader = torch.utils.data.DataLoader(
        CaptionImages(val.images, backend.preprocess, config.max_pixels),
        batch_size=config.batch_size,
        num_workers=config.workers,
        collate_fn=as_list,
    )
    zs, ids, failed = [], [], 0
    for batch in loader:
        good = [(i, x) for i, x, err in batch if err is None and x is not None]
        failed += len(batch) - len(good)
        if good:
            zs.append(
                pooled_embeddings(backend, head, torch.stack([x for _, x in good]), config)[0]
            )
            ids += [val.caption_ids[i] for i, _ in good]
    result: dict[str, float] = {"val_images": len(ids), "val_unreadable": failed}
    if not ids:
        return result
    z, id_tensor = torch.cat(zs), torch.tensor(ids, device=backend.device)
    total = 0.0
    for s in range(0, len(ids), config.batch_size):
        part = slice(s, s + config.batch_size)
        loss = contrastive_loss(z[part], bank(ids[part]), scale, id_tensor[part])
        total += float(loss) * len(ids[part])
    distinct = sorted(set(ids))
    best = (z @ bank(distinct).T).argmax(dim=1)
    predicted = torch.tensor(distinct, device=backend.device)[best]
    result["val_loss"] = total / len(ids)
    result["val_top1"] = float((predicted == id_tensor).float().mean())
    return result


def _check_options(config: TrainConfig, backend: Backend, d: Dist, n: int) -> None:
    positive = {"batch_size": config.batch_size, "accum_steps": config.accum_steps,
                "checkpoint_every": config.checkpoint_every, "log_every": config.log_every}  # fmt: skip
    for name, value in positive.items():
        if value < 1:
            raise ClipvizError(f"--{name.replace('_', '-')} must be at least 1 (got {value})")
    if config.epochs is not None and config.steps is not None:
        raise ClipvizError("pass --epochs or --steps, not both")
    for name, count in (("epochs", config.epochs), ("steps", config.steps)):
        if count is not None and count < 1:
            raise ClipvizError(f"--{name} must be at least 1 (got {count})")
    if config.lr <= 0 or config.weight_decay < 0 or config.warmup < 0 or config.distill < 0:
        raise ClipvizError(
            "--lr must be positive; --weight-decay, --warmup, --distill not negative"
        )
    if config.batch_size % d.world:
        raise ClipvizError(
            f"--batch-size {config.batch_size} (the global batch) is not divisible by the "
            f"{d.world} processes; use a multiple of {d.world}"
        )
    if config.train_ln_post and backend.tower != "vit":
        raise ClipvizError("--train-ln-post applies to ViT towers only (ResNets have no ln_post)")
    free_attention_mask(torch.ones(1, 2), config.mask_rule, config.mask_value)  # checks the rule
    if n // config.batch_size // config.accum_steps == 0:
        raise ClipvizError(
            f"the training data has {n} usable pairs, fewer than one optimizer step "
            f"(--batch-size {config.batch_size} × --accum-steps {config.accum_steps}); "
            "lower them or add data"
        )


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
    _check_options(config, backend, d, len(data))
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
            raise ClipvizError(f"nothing to resume: {checkpoint} does not exist; drop --resume")
        step = load_checkpoint(
            checkpoint, backend, head, log_scale, optimizer, named, run_config, NOT_COMPARED
        )
    elif checkpoint.exists() or (out / FINAL).exists():
        raise ClipvizError(
            f"{out} already holds a training run; pass --resume to continue it, "
            "or choose another --out"
        )
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        if resume:
            trim_metrics(metrics, step)
        else:
            write_text_atomic(metrics, "")
        write_json_atomic(
            out / "run.json",
            {
                "base": base_identity(backend),
                "config": run_config,
                "runtime": {k: getattr(config, k) for k in sorted(RUNTIME_FIELDS)},
                "world_size": d.world,
                "data": {"source": str(data.source), "format": data.format, "pairs": len(data),
                         "captions": len(data.unique_captions), "skipped": dict(data.skipped)},
                "val_data": str(val.source) if val is not None else None,
                "resumed_from": step if resume else None,
            },
        )  # fmt: skip

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
            micro = _micro_step(
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
            on_step(step, total, {"loss": last_loss or math.nan, "images_per_s": images / seconds})
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
        if val is not None and val_bank is not None and (step % val_every == 0 or step == total):
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


__all__ = [
    "CHECKPOINT",
    "FINAL",
    "METRICS",
    "Dist",
    "TrainConfig",
    "TrainResult",
    "cleanup_distributed",
    "describe_skipped",
    "learning_rate",
    "setup_distributed",
    "train",
]
