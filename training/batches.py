"""Batches of pixels for training, without Ray: from an in-memory cache of a shard.

    >>> cache = Cache.allocate(rows, 12288, device)     # a whole shard, filled batch by batch
    >>> for X, y in cache.batches(256, epoch_seed):     # a fresh permutation every epoch
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from common import heap


def fits(nbytes: int, device: torch.device, reserve: float = 0.2) -> bool:
    """Whether ``nbytes`` more fit in the device's free memory, keeping ``reserve`` of it free."""
    if device.type == "cuda":
        free = heap.gpu_free(device)
    else:
        try:
            import os

            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return False
    return nbytes <= free * (1.0 - reserve)


class Cache:
    """A whole shard held as uint8 pixels (N, D) and int64 labels (N,) on one device."""

    def __init__(self, X: torch.Tensor, y: torch.Tensor):
        self.X, self.y, self.n = X, y, 0

    @classmethod
    def allocate(cls, rows: int, D: int, device: torch.device) -> Cache:
        return cls(torch.empty((rows, D), dtype=torch.uint8, device=device),
                   torch.empty((rows,), dtype=torch.int64, device=device))

    def append(self, X: torch.Tensor, y: torch.Tensor) -> None:
        """Copy one batch in, growing (with one copy) if the shard is larger than allocated."""
        end = self.n + len(y)
        if end > len(self.y):
            grow = max(end, int(len(self.y) * 1.25))
            self.X = torch.cat([self.X[: self.n], self.X.new_empty((grow - self.n, X.shape[1]))])
            self.y = torch.cat([self.y[: self.n], self.y.new_empty((grow - self.n,))])
        self.X[self.n: end] = X.to(self.X.device, non_blocking=True)
        self.y[self.n: end] = y.to(self.y.device, non_blocking=True)
        self.n = end

    def truncate(self, rows: int) -> None:
        """Keep the first ``rows`` rows (so that every rank runs the same number of steps)."""
        self.n = min(self.n, rows)
        self.X, self.y = self.X[: self.n], self.y[: self.n]

    def batches(self, batch_size: int, seed: int | None = None
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches in a permutation drawn from ``seed`` (in order when seed is None)."""
        if seed is None:
            order = torch.arange(self.n, device=self.X.device)
        else:
            gen = torch.Generator().manual_seed(seed)
            order = torch.randperm(self.n, generator=gen).to(self.X.device)
        for i in range(0, self.n, batch_size):
            idx = order[i: i + batch_size]
            yield self.X[idx], self.y[idx]


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """A seed for one rank's shuffle in one epoch: a function of the three only, so that a
    resumed run draws the same batches as an uninterrupted one."""
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])
