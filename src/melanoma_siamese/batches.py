"""Where stage 1's training batches come from, one class per way, chosen by `make_batch_source`.

Every source gives, for an epoch, an iterable of (images, labels) on the training device; labels are
None for the reference's sampled triplets (anchors, positives, negatives stacked: three backbone
passes per triplet). Each epoch is a pure function of (seed, epoch, rank), so a resumed run repeats it.
"""
from __future__ import annotations

from typing import Iterable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader

from .augment import BatchAugment, async_to
from .config import Config
from .data.images import (CachedImages, EpochBatches, TripletImages, item_seeds, sample_triplets, train_transform,
                          triplet_keys)
from .data.sampler import BalancedBatchSampler
from .distributed import Dist


def _loader(dataset, config: Config, device: torch.device) -> tuple[DataLoader, EpochBatches]:
    """One DataLoader for the whole run (workers kept alive across epochs); its batches of keys are set
    before each epoch. Each key carries its own augmentation seed, so which worker makes an item, and
    how long the workers have lived, does not change it."""
    rt = config.runtime
    keys = EpochBatches()
    loader = DataLoader(dataset, batch_sampler=keys, num_workers=rt.num_workers,
                        persistent_workers=rt.num_workers > 0, pin_memory=device.type == "cuda",
                        generator=torch.Generator().manual_seed(rt.seed))
    return loader, keys


class TripletBatches:
    """The reference's sampled triplets, augmented per sample in DataLoader workers."""
    passes_per_image = 3

    def __init__(self, config: Config, array: np.ndarray, rows: np.ndarray, labels: np.ndarray,
                 device: torch.device, d: Dist = Dist()):
        s, dc = config.siamese, config.data
        self.rows, self.labels, self.device, self.d = rows, labels, device, d
        self.seed, self.balanced, self.batch_size = config.runtime.seed, s.balanced, s.batch_size
        self.epoch_images = s.epoch_images or len(rows)
        transform = train_transform(dc.image_size, dc.mean, dc.std, dc.augment)
        self.loader, self.keys = _loader(TripletImages(array, transform), config, device)
        self.epoch_rows = np.zeros(0, dtype=np.int64)

    def epoch(self, epoch: int) -> Iterable:
        rng = np.random.default_rng([self.seed, epoch])
        triplets = sample_triplets(self.rows, self.labels, self.epoch_images, self.balanced, rng)
        seeds = item_seeds(self.seed, epoch, len(triplets))  # by position in the whole epoch
        d = self.d
        triplets, seeds = triplets[d.rank::d.world_size], seeds[d.rank::d.world_size]
        keys = triplet_keys(triplets, seeds)
        per = self.batch_size // d.world_size
        self.keys.set([keys[i:i + per] for i in range(0, len(keys) - per + 1, per)])
        self.epoch_rows = triplets.ravel()
        return self._iterate()

    def _iterate(self) -> Iterator:
        for batch in self.loader:
            yield torch.cat([t.to(self.device, non_blocking=True) for t in batch]), None


class SampleBatches:
    """Class-balanced batches for in-batch mining, augmented per sample in DataLoader workers."""
    passes_per_image = 1

    def __init__(self, config: Config, array: np.ndarray, rows: np.ndarray, labels: np.ndarray,
                 device: torch.device, d: Dist = Dist()):
        s, dc = config.siamese, config.data
        self.rows, self.d, self.seed = rows, d, config.runtime.seed
        self.sampler = BalancedBatchSampler(labels, s.batch_size, self.seed, s.balanced, s.epoch_images, d.rank,
                                            d.world_size)
        transform = train_transform(dc.image_size, dc.mean, dc.std, dc.augment)
        self.loader, self.keys = _loader(CachedImages(array, rows, labels, transform), config, device)
        self.epoch_rows = np.zeros(0, dtype=np.int64)

    def epoch(self, epoch: int) -> Iterable:
        self.sampler.set_epoch(epoch)
        positions = self.sampler.batches()
        seeds = iter(item_seeds(self.seed, epoch, sum(len(b) for b in positions), stream=1 + self.d.rank))
        self.keys.set([[(int(i), int(next(seeds))) for i in b] for b in positions])
        self.epoch_rows = self.rows[np.concatenate(positions)] if positions else self.epoch_rows[:0]
        return ((images, labels) for images, labels, _ in self.loader)


class DeviceBatches:
    """Class-balanced batches gathered from the uint8 cache and augmented as tensors on the device.

    Where the training images fit in GPU memory they are copied there once and gathered there;
    otherwise each uint8 batch is gathered on the CPU and sent from pinned memory.
    """
    passes_per_image = 1

    def __init__(self, config: Config, array: np.ndarray, rows: np.ndarray, labels: np.ndarray,
                 device: torch.device, d: Dist = Dist(), channels_last: bool = False):
        s, dc, rt = config.siamese, config.data, config.runtime
        self.array, self.rows, self.device, self.d, self.seed = array, rows, device, d, rt.seed
        self.augment = BatchAugment(dc.image_size, dc.mean, dc.std, dc.augment)
        self.labels = torch.as_tensor(labels).to(device)
        self.channels_last = channels_last
        self.sampler = BalancedBatchSampler(labels, s.batch_size, rt.seed, s.balanced, s.epoch_images, d.rank,
                                            d.world_size)
        self.on_device, self.position = None, None
        if device.type == "cuda" and rt.gpu_cache == "auto":
            free, _ = torch.cuda.mem_get_info(device)
            if array[0].nbytes * len(rows) < 0.5 * free:
                self.on_device = torch.from_numpy(np.ascontiguousarray(array[np.sort(rows)])).to(device)
                self.position = np.searchsorted(np.sort(rows), rows)
        self.epoch_rows = np.zeros(0, dtype=np.int64)

    def epoch(self, epoch: int) -> Iterable:
        self.sampler.set_epoch(epoch)
        positions = self.sampler.batches()
        self.epoch_rows = self.rows[np.concatenate(positions)] if positions else self.epoch_rows[:0]
        generator = torch.Generator().manual_seed(self.seed * 100003 + epoch * 131 + self.d.rank)
        return (batch[:2] for batch in self.batches(positions, generator))

    def _upload(self, values: np.ndarray) -> torch.Tensor:
        return async_to(torch.from_numpy(np.ascontiguousarray(values, dtype=np.int64)), self.device)

    def batches(self, positions: list[np.ndarray], generator: torch.Generator) -> Iterator:
        """(images, labels, positions) for each batch of positions into the training rows."""
        # The epoch's indices go to the device in one asynchronous copy: a copy per batch from pageable
        # memory would wait for the GPU queue to drain every step.
        flat = np.concatenate(positions) if len(positions) else np.zeros(0, dtype=np.int64)
        labels = self.labels[self._upload(flat)]
        on_device = self._upload(self.position[flat]) if self.on_device is not None else None
        start = 0
        for idx in positions:
            end = start + len(idx)
            if on_device is not None:
                pixels = self.on_device[on_device[start:end]]
            else:
                pixels = torch.from_numpy(np.asarray(self.array[self.rows[idx]]))
                if self.device.type == "cuda":
                    pixels = async_to(pixels, self.device)
            images = self.augment(pixels, generator)
            if self.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            yield images, labels[start:end], idx
            start = end


def make_batch_source(config: Config, array: np.ndarray, rows: np.ndarray, labels: np.ndarray,
                      device: torch.device, d: Dist = Dist(), channels_last: bool = False):
    """The batch source the configuration describes: sampled triplets (siamese.mining: sampled), batches
    augmented as tensors on the device (runtime.batch_augment), or per-sample augmented batches."""
    if config.siamese.mining == "sampled":
        return TripletBatches(config, array, rows, labels, device, d)
    if config.runtime.batch_augment:
        return DeviceBatches(config, array, rows, labels, device, d, channels_last)
    return SampleBatches(config, array, rows, labels, device, d)
