"""Joining a torchrun job (several processes, GPUs or machines; SLURM through torchrun's
environment) and the few collective steps runs need: a barrier, the largest value of all,
errors that end every rank alike."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as torch_dist

from .errors import ClipvizError

T = TypeVar("T")


@dataclass(frozen=True)
class Dist:
    """This process's place in a torch.distributed job (rank 0 of 1 without one)."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str = "auto") -> tuple[Dist, str]:
    """Join the torchrun job if there is one: NCCL on GPUs, gloo on CPU.

    Returns this rank's `Dist` and the device it should load the model on (`cuda:LOCAL_RANK`
    for `auto`/`cuda`).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(), device
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if cuda:
        device = f"cuda:{local}" if device in ("auto", "cuda") else device
        torch.cuda.set_device(torch.device(device))
    elif device == "auto":
        device = "cpu"
    if not torch_dist.is_initialized():
        # ranks wait at the end for the slowest (one shard more, a slower node): hours, not
        # the default half hour; a rank that dies makes torchrun stop the others anyway
        torch_dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(hours=24))
    return Dist(rank, world), device


def cleanup_distributed() -> None:
    if torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def barrier(d: Dist) -> None:
    """Wait until every rank is here (nothing to wait for in a single process)."""
    if d.world > 1:
        torch_dist.barrier()


def _collective_device() -> torch.device:
    """Where a collective's tensor must live: NCCL reduces CUDA tensors only."""
    if torch_dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_max(value: int, d: Dist) -> int:
    """The largest `value` over all ranks (this one's without a job)."""
    if d.world == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=_collective_device())
    torch_dist.all_reduce(t, op=torch_dist.ReduceOp.MAX)
    return int(t.item())


def all_sum(values: list[int], d: Dist) -> list[int]:
    """Each of `values` summed over all ranks (this rank's without a job)."""
    if d.world == 1:
        return values
    t = torch.tensor(values, dtype=torch.int64, device=_collective_device())
    torch_dist.all_reduce(t, op=torch_dist.ReduceOp.SUM)
    return [int(v) for v in t.tolist()]


def broadcast(value: T, d: Dist) -> T:
    """Rank 0's `value` on every rank (a picklable object: thresholds, options)."""
    if d.world == 1:
        return value
    box = [value]
    torch_dist.broadcast_object_list(box, src=0)
    return box[0]


class JobError(ClipvizError):
    """An error that every rank of a torchrun job raises alike (see `together`): each rank can
    say it, and only rank 0 need carry its exit code."""


def agree(error: ClipvizError | None, d: Dist) -> ClipvizError | None:
    """The error of the first rank that has one, as the same `JobError` on every rank (None
    when no rank has one); this rank's own `error` without a job."""
    if d.world == 1:
        return error
    mine = None if error is None else (str(error), error.exit_code)
    found: list[tuple[str, int] | None] = [None] * d.world
    torch_dist.all_gather_object(found, mine)
    for rank, got in enumerate(found):
        if got is not None:
            message, code = got
            return JobError(message if rank == 0 else f"rank {rank}: {message}", code)
    return None


@contextlib.contextmanager
def together(d: Dist) -> Iterator[None]:
    """Run a step on every rank of a job and end it together: when the step raised on any
    rank, every rank raises the same `JobError` (rather than one rank dying and the others
    crashing in their next collective). Without a job, errors pass unchanged."""
    if d.world == 1:
        yield
        return
    error: ClipvizError | None = None
    cause: BaseException | None = None
    try:
        yield
    except ClipvizError as e:
        error, cause = e, e
    except Exception as e:  # noqa: BLE001 - said on every rank, then raised there
        error, cause = ClipvizError(f"internal error: {type(e).__name__}: {e}", 1), e
    if (shared := agree(error, d)) is not None:
        raise shared from cause


def refuse_stdin(*paths: str | None) -> None:
    """Lists read from stdin (`-`) cannot be shared by the processes of a torchrun job:
    each would read a different part of it."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and "-" in paths:
        raise ClipvizError(
            "'-' (stdin) cannot be read by several torchrun processes; write the list to a "
            "file and pass its path"
        )
