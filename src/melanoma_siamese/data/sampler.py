"""Batches for in-batch mining: class-balanced, seeded per epoch, every image seen.

pytorch-metric-learning's MPerClassSampler draws with replacement from a module-level generator, so
some benign images are never seen in an epoch and runs only repeat if that global is seeded. This
sampler walks a fresh permutation of each class (cycling the rarer one), so within an epoch every
benign image is seen once before any repeats, and the stream is a pure function of (seed, epoch).
"""
from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np


class BalancedBatchSampler:
    """Yields lists of dataset indices. An epoch is `epoch_images` images (default: the dataset's size).

    balanced=True: each batch holds batch_size/2 of each class. balanced=False: plain shuffled batches.
    `rank`/`world_size` give each process its own disjoint share of every batch (DDP).
    """

    def __init__(self, labels: Sequence[int], batch_size: int, seed: int, balanced: bool = True,
                 epoch_images: int = 0, rank: int = 0, world_size: int = 1):
        self.labels = np.asarray(labels)
        if balanced and batch_size % 2:
            raise ValueError(f"balanced batches need an even batch size, got {batch_size}")
        if balanced and min((self.labels == 0).sum(), (self.labels == 1).sum()) == 0:
            raise ValueError("balanced batches need images of both classes in the training part")
        self.batch_size, self.seed, self.balanced = batch_size, seed, balanced
        self.epoch_images = epoch_images or len(self.labels)
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return max(1, self.epoch_images // self.batch_size)

    def _stream(self, pool: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
        repeats = -(-count // len(pool))
        return np.concatenate([rng.permutation(pool) for _ in range(repeats)])[:count]

    def batches(self) -> list[np.ndarray]:
        rng = np.random.default_rng([self.seed, self.epoch])
        n = len(self)
        if self.balanced:
            half = self.batch_size // 2
            streams = [self._stream(np.flatnonzero(self.labels == c), n * half, rng).reshape(n, half) for c in (0, 1)]
            # Each rank takes its own slice of both classes, so every rank's share stays balanced.
            return [np.concatenate([s[i, self.rank::self.world_size] for s in streams]) for i in range(n)]
        out = self._stream(np.arange(len(self.labels)), n * self.batch_size, rng).reshape(n, self.batch_size)
        return [row[self.rank::self.world_size] for row in out]

    def __iter__(self) -> Iterator[list[int]]:
        for row in self.batches():
            yield row.tolist()
