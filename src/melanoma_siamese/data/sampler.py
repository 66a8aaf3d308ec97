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
    `rank`/`world_size` give each process a disjoint share of the epoch (DDP): with balanced batches
    each process cycles through its own part of each class.
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

    def _stream(self, pool: np.ndarray, count: int, epoch_rng: np.random.Generator, key: int) -> np.ndarray:
        """`count` indices for this rank: its own slice of a shuffled pool, cycled in fresh permutations.

        The pool is shuffled with the generator every rank shares, then split between ranks, so no two
        ranks see the same image in an epoch; the cycling uses a per-rank generator.
        """
        mine = epoch_rng.permutation(pool)[self.rank::self.world_size]
        rng = np.random.default_rng([self.seed, self.epoch, key, self.rank])
        repeats = -(-count // len(mine))
        return np.concatenate([mine] + [rng.permutation(mine) for _ in range(repeats - 1)])[:count]

    def batches(self) -> list[np.ndarray]:
        """This rank's share of every batch of the epoch (batch_size / world_size indices each)."""
        if self.batch_size % self.world_size:
            raise ValueError(f"batch size {self.batch_size} does not split over {self.world_size} processes")
        rng = np.random.default_rng([self.seed, self.epoch])
        n = len(self)
        share = self.batch_size // self.world_size
        if self.balanced:
            if share % 2:
                raise ValueError(f"balanced batches need an even share per process, got {share}")
            half = share // 2
            streams = [self._stream(np.flatnonzero(self.labels == c), n * half, rng, c).reshape(n, half)
                       for c in (0, 1)]
            return [np.concatenate([streams[0][i], streams[1][i]]) for i in range(n)]
        return list(self._stream(np.arange(len(self.labels)), n * share, rng, 2).reshape(n, share))

    def __iter__(self) -> Iterator[list[int]]:
        for row in self.batches():
            yield row.tolist()
