"""ECLIP training state: safetensors checkpoints and the torch.distributed plumbing.

Checkpoints hold `head.<name>` trained tensors, `train.logit_scale` (log of the scale),
`train.step`, `optim.<param>.<key>` AdamW state and `rng.torch`/`rng.cuda` generator states
(uint8), with metadata `base` (the base model's identity), `config`, `format`, `kind` and
`step`; nothing is unpickled on load. See `clipviz.eclip.train` for why gradients are summed.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as torch_dist
from torch import nn

from ..backend import Backend
from ..distributed import Dist, cleanup_distributed, setup_distributed
from ..errors import ClipvizError
from ..files import atomic_path, provenance, read_jsonl, write_text_atomic
from .head import ExplainHead, base_identity, describe_identity

FORMAT = "clipviz-eclip/1"
__all__ = ["Dist", "cleanup_distributed", "setup_distributed"]

# -- distributed ----------------------------------------------------------------------------


def gather(x: torch.Tensor, d: Dist) -> torch.Tensor:
    """Every rank's `x` concatenated in rank order; only this rank's slice keeps its gradient."""
    if d.world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(d.world)]
    torch_dist.all_gather(parts, x.detach().contiguous())
    parts[d.rank] = x
    return torch.cat(parts)


# -- data order and schedule -------------------------------------------------------------


def reduce_gradients(
    head_params: Sequence[nn.Parameter], scale: nn.Parameter | None, d: Dist
) -> None:
    """SUM the head's gradients over ranks (each holds only its slice's share); average the
    scale's (each rank already holds its full gradient)."""
    if d.world == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in head_params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch_dist.all_reduce(flat, op=torch_dist.ReduceOp.SUM)
    for p, g in zip(head_params, flat.split([p.numel() for p in head_params]), strict=True):
        p.grad = g.view_as(p).clone()
    if scale is not None:
        g = scale.grad if scale.grad is not None else torch.zeros_like(scale)
        torch_dist.all_reduce(g, op=torch_dist.ReduceOp.SUM)
        scale.grad = g / d.world


# -- checkpoints ----------------------------------------------------------------------------


def _rng_tensors(device: torch.device) -> dict[str, torch.Tensor]:
    states = {"rng.torch": torch.get_rng_state()}
    if device.type == "cuda":
        states["rng.cuda"] = torch.cuda.get_rng_state(device)
    return states


def save_checkpoint(
    path: Path,
    head: ExplainHead,
    log_scale: torch.Tensor,
    step: int,
    meta: dict[str, str],
    optimizer: torch.optim.Optimizer | None = None,
    names: Sequence[tuple[str, nn.Parameter]] = (),
) -> None:
    """Write a checkpoint atomically; without `optimizer` only the trained tensors (final)."""
    from safetensors.torch import save_file

    tensors = {f"head.{k}": v for k, v in head.trained_tensors().items()}
    tensors["train.logit_scale"] = log_scale.detach().float().cpu().reshape(1).clone()
    tensors["train.step"] = torch.tensor([step], dtype=torch.int64)
    kind = "final"
    if optimizer is not None:
        kind = "checkpoint"
        for name, p in names:
            for key, value in optimizer.state.get(p, {}).items():
                t = value if isinstance(value, torch.Tensor) else torch.tensor(value)
                tensors[f"optim.{name}.{key}"] = t.detach().cpu().contiguous().clone()
        tensors.update(_rng_tensors(log_scale.device))
    metadata = {**meta, "format": FORMAT, "kind": kind, "step": str(step),
                "provenance": json.dumps(provenance(), sort_keys=True)}  # fmt: skip
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def _check_base(meta: dict[str, str], backend: Backend, path: Path) -> None:
    if "base" not in meta:
        raise ClipvizError(
            f"{path} has no base-model identity, so it is not an ECLIP training checkpoint; "
            "start a new `out` or drop `resume`"
        )
    base, mine = json.loads(meta["base"]), base_identity(backend)
    if base != mine:
        raise ClipvizError(
            f"{path} was trained for {describe_identity(base)}, but the loaded model is "
            f"{describe_identity(mine)}; pass the same `model`/`pretrained` as in training"
        )


def _check_config(
    saved: dict[str, Any], mine: dict[str, Any], path: Path, ignore: frozenset[str]
) -> None:
    diffs = [
        f"{k}={saved.get(k)!r} (now {mine.get(k)!r})"
        for k in sorted(mine.keys() - ignore)
        if saved.get(k) != mine.get(k)
    ]
    if diffs:
        raise ClipvizError(
            f"cannot resume {path}: it was made with {', '.join(diffs)}; resume with the same "
            "data and options, or start a new `out`"
        )


def load_checkpoint(
    path: Path,
    backend: Backend,
    head: ExplainHead,
    log_scale: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    names: Sequence[tuple[str, nn.Parameter]],
    config: dict[str, Any],
    ignore: frozenset[str] = frozenset(),
) -> int:
    """Restore a training checkpoint into the given objects; returns its step.

    config: the run's result-shaping options, compared with the checkpoint's except `ignore`.
    """
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for bad files
        raise ClipvizError(
            f"{path} is not a readable safetensors checkpoint ({e}); it is damaged — start a "
            "new `out` or drop `resume`"
        ) from e
    _check_base(meta, backend, path)
    _check_config(json.loads(meta.get("config", "{}")), config, path, ignore)
    if meta.get("kind") != "checkpoint":
        raise ClipvizError(
            f"{path} holds no training state, so it cannot be resumed; start a new `out` or "
            "drop `resume`"
        )
    needed = {"train.logit_scale", "train.step", "rng.torch"} | {
        f"head.{k}" for k in head.state_dict()
    }
    if missing := sorted(needed - tensors.keys()):
        raise ClipvizError(
            f"cannot resume {path}: it lacks {', '.join(missing[:4])}"
            f"{' …' if len(missing) > 4 else ''}; it is damaged or not a clipviz training "
            "checkpoint — start a new `out` or drop `resume`"
        )
    try:
        _restore(tensors, head, log_scale, optimizer, names)
    except (RuntimeError, ValueError, KeyError) as e:
        raise ClipvizError(
            f"cannot resume {path}: its state does not fit this run "
            f"({str(e).splitlines()[0][:200]}); start a new `out` or drop `resume`"
        ) from e
    return int(tensors["train.step"].item())


def _restore(
    tensors: dict[str, torch.Tensor],
    head: ExplainHead,
    log_scale: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    names: Sequence[tuple[str, nn.Parameter]],
) -> None:
    head.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("head.")})
    with torch.no_grad():
        log_scale.copy_(tensors["train.logit_scale"].reshape(log_scale.shape))
    state = optimizer.state_dict()
    state["state"] = {}
    for index, (name, _) in enumerate(names):
        prefix = f"optim.{name}."
        entry = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        if entry:
            state["state"][index] = entry
    optimizer.load_state_dict(state)
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and log_scale.device.type == "cuda":
        torch.cuda.set_rng_state(tensors["rng.cuda"], log_scale.device)


def trim_metrics(path: Path, step: int) -> None:
    """Drop log lines written after the checkpoint a resumed run restarts from."""
    kept = [r for r in read_jsonl(path) if int(r.get("step", 0)) <= step]
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))


# -- validation and the loop ---------------------------------------------------------------
