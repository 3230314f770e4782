"""The data order and learning rate of ECLIP training: pure functions of (seed, epoch) and
(step, total), so a resumed run sees what an uninterrupted one would."""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch

from .config import TrainConfig
from .state import Dist


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
