"""What bench's training rows run: each recipe's batch source and training step as `train` builds them, the
reference's way of feeding its model (PIL decode and torchvision transforms per sample, DataLoader workers),
and the timer that counts the images going through either.
"""
from __future__ import annotations

import os
import time
from typing import Callable, Iterable

import numpy as np
import torch


class TimedBatches:
    """Wraps a batch iterable; times everything from the request of batch `warmup` to the end.

    The clock covers both making the timed batches and whatever the consumer does with them, so a
    training loop that pulls from this measures images per second end to end. `sync` (e.g.
    torch.cuda.synchronize) runs at both ends, so queued GPU work is counted where it belongs.
    """

    def __init__(self, batches: Iterable, warmup: int, count: Callable[[object], int],
                 sync: Callable[[], None] = lambda: None):
        self.batches, self.warmup, self.count, self.sync = batches, warmup, count, sync
        self.images, self.seconds, self._start = 0, 0.0, None

    def __iter__(self):
        it = iter(self.batches)
        index = 0
        while True:
            if index == self.warmup:
                self.sync()
                self._start = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                break
            if index >= self.warmup:
                self.images += self.count(batch)
            yield batch
            index += 1
        self.sync()
        if self._start is not None:
            self.seconds = time.perf_counter() - self._start

    @property
    def rate(self) -> float:
        if self._start is None or self.images == 0:
            raise RuntimeError(f"nothing was timed: the batches ran out within the {self.warmup} warm-up batches")
        return self.images / self.seconds


def drain(timed: TimedBatches) -> float:
    for _ in timed:
        pass
    return timed.rate


def host_syncs_per_batch(batches: Iterable, skip: int, count: int) -> float:
    """Mean number of times making one batch made the host wait for the GPU (CUDA's sync debug mode),
    over `count` batches after `skip` (one-off set-up such as copying constants is not counted)."""
    import warnings

    it = iter(batches)
    for _ in range(skip):
        next(it)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(count):
                next(it)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    # Turning the mode on itself warns once that it is a prototype: not a sync.
    return sum("synchronizing" in str(w.message) and "prototype" not in str(w.message) for w in caught) / count


def triplet_images(batch) -> int:
    return 3 * len(batch[0])


def batch_images(batch) -> int:
    return len(batch[0])


class JpegTriplets(torch.utils.data.Dataset):
    """The reference's input: each triplet opens and decodes its three JPEG files with PIL and
    augments them one by one with torchvision's PIL transforms."""

    def __init__(self, paths: list[str], triplets: np.ndarray, transform):
        self.paths, self.triplets, self.transform = paths, triplets, transform

    def __len__(self) -> int:
        return len(self.triplets)

    def __getitem__(self, i: int):
        from PIL import Image

        out = []
        for row in self.triplets[i]:
            with Image.open(self.paths[int(row)]) as image:
                out.append(self.transform(image.convert("RGB")))
        return tuple(out)


def mean_kib(paths: list[str]) -> float:
    return float(np.mean([os.path.getsize(p) for p in paths])) / 1024


def reference_transform(size: int, mean: float, std: float, augment):
    """torchvision (v1) transforms on PIL images, as the reference: resize, rotate, jitter, flip, normalise."""
    from torchvision import transforms as T

    return T.Compose([
        T.Resize((size, size)), T.RandomRotation(augment.rotation_degrees),
        T.ColorJitter(augment.brightness, augment.contrast, augment.saturation, augment.hue),
        T.RandomHorizontalFlip(), T.RandomVerticalFlip(), T.ToTensor(), T.Normalize([mean] * 3, [std] * 3)])


def reference_loader(paths: list[str], triplets: np.ndarray, size: int, batch_triplets: int, workers: int,
                     seed: int, pin_memory: bool = False) -> torch.utils.data.DataLoader:
    from .config import DataConfig

    d = DataConfig()
    return torch.utils.data.DataLoader(
        JpegTriplets(paths, triplets, reference_transform(size, d.mean, d.std, d.augment)),
        batch_size=batch_triplets, shuffle=False, num_workers=workers, drop_last=True, pin_memory=pin_memory,
        generator=torch.Generator().manual_seed(seed))


def recipe_config(recipe: str, backbone: str, size: int, batch: int, seed: int, epoch_images: int = 0):
    """The configuration train would run for a recipe: 'ours' (balanced batches, multi-similarity loss and
    miner, CE head, batches augmented as tensors on the device) or 'reference' (sampled triplets, fp32).
    `batch` is the batch size in images ('ours') or triplets ('reference')."""
    from .config import Config, DataConfig, ModelConfig, RuntimeConfig, SiameseConfig

    if recipe == "ours":
        siamese = SiameseConfig(loss="multi_similarity", mining="multi_similarity", margin=0.5, ce_weight=1.0,
                                batch_size=batch, epoch_images=epoch_images, optimizer="adamw")
        runtime = RuntimeConfig(seed=seed, num_workers=0, progress=False)
    else:
        siamese = SiameseConfig(loss="triplet", mining="sampled", margin=1.0, batch_size=batch,
                                epoch_images=epoch_images)
        runtime = RuntimeConfig(seed=seed, num_workers=0, progress=False, amp="off", channels_last="off")
    return Config(data=DataConfig(image_size=size), model=ModelConfig(backbone, "none", 512), siamese=siamese,
                  runtime=runtime)


def train_step(config, labels: np.ndarray, device: torch.device):
    """The training step train builds for `config` (encoder, objective, optimizer, precision, backend flags)."""
    from .engine import TrainStep
    from .models import Encoder
    from .objective import make_objective
    from .optim import encoder_optimizer
    from .runtime import precision_for, set_backend_flags
    from .stage1 import TrainModule

    set_backend_flags(device)
    precision = precision_for(config.runtime, device)
    encoder = precision.layout(Encoder(config.model.backbone, "none", config.model.embedding_dim,
                                       ce_head=config.siamese.ce_weight > 0).to(device))
    objective = make_objective(config, labels, device)
    optimizer = encoder_optimizer(config.siamese, encoder, objective.parameters())
    return TrainStep(TrainModule(encoder, objective.metric_loss), objective, optimizer, precision)


def our_source(array: np.ndarray, rows: np.ndarray, labels: np.ndarray, size: int, device: torch.device,
               channels_last: bool = False, batch: int = 64, seed: int = 0):
    """Our training input (batches.DeviceBatches, as train builds it): the uint8 cache, batches augmented
    as tensors on `device`."""
    from .batches import DeviceBatches

    return DeviceBatches(recipe_config("ours", "resnet18", size, batch, seed), array, rows, labels, device,
                         channels_last=channels_last)


def our_epoch(source, labels: np.ndarray, batch: int, count: int, seed: int):
    """`count` class-balanced batches of (images, labels) from `source`, as train_siamese draws them."""
    from .data.sampler import BalancedBatchSampler

    sampler = BalancedBatchSampler(labels, batch, seed, balanced=True, epoch_images=batch * count)
    return ((images, y) for images, y, _ in source.batches(sampler.batches(), torch.Generator().manual_seed(seed)))


def stacked_triplets(batches: Iterable, device: torch.device):
    """(anchors, positives, negatives) batches as the training loop takes them: stacked, on `device`."""
    for batch in batches:
        yield torch.cat([t.to(device, non_blocking=True) for t in batch]), None


class PassCounter:
    """Forward hook that counts the images passed through a module."""

    def __init__(self, module: torch.nn.Module):
        self.images = 0
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output) -> None:
        self.images += len(inputs[0])

    def close(self) -> None:
        self.handle.remove()


def short_epoch_passes(recipe: str, array: np.ndarray, rows: np.ndarray, labels: np.ndarray, backbone: str,
                       size: int, device: torch.device, seed: int) -> float:
    """Backbone passes per training image in one epoch over `rows` of the recipe, with the batch source and
    training step train builds: 'reference' (sampled triplets, three passes each) or 'ours' (balanced
    batches, in-batch mining)."""
    from .batches import make_batch_source
    from .engine import train_siamese_epoch

    torch.manual_seed(seed)
    n = len(rows)
    # An epoch of the reference: as many sampled triplets as training images, in two batches; ours: one batch.
    config = recipe_config(recipe, backbone, size, n // 2 if recipe == "reference" else n, seed, epoch_images=n)
    step = train_step(config, labels, device)
    counter = PassCounter(step.model.encoder)
    try:
        train_siamese_epoch(step, make_batch_source(config, array, rows, labels, device).epoch(1))
    finally:
        counter.close()
    return counter.images / n

