"""Decode images once into a uint8 array file (the cache), and the transforms applied to it.

Decoding is also validation: a file that does not decode is found here, before any model is built.
The cache is keyed by the image files (name, size, mtime) and the resolution, and rebuilt when either
changes; later runs memory-map it instead of decoding again.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torchvision.transforms import v2

from ..config import AugmentConfig
from ..inputs import decode_image
from ..preprocess import to_model_input
from .hdf5 import MemberReader, split_member


@dataclass
class ImageCache:
    array: np.ndarray  # N x S x S x 3 uint8 (memory-mapped)
    failures: dict[int, str]  # row -> reason
    conversions: dict[str, int]  # e.g. {"mode L": 3, "resized": 10}
    path: Optional[Path]


def _cache_key(paths: Sequence[str], size: int) -> str:
    digest = hashlib.sha1(f"v1|{size}".encode())
    for p in paths:
        try:
            stat = os.stat(split_member(p)[0])  # an HDF5 member: its file's size and time
            digest.update(f"|{p}|{stat.st_size}|{stat.st_mtime_ns}".encode())
        except OSError:
            digest.update(f"|{p}|absent".encode())
    return digest.hexdigest()[:20]


def default_cache_dir() -> Path:
    return Path(os.environ.get("MELANOMA_SIAMESE_CACHE", Path.home() / ".cache" / "melanoma-siamese"))


def build_cache(
    paths: Sequence[str],
    size: int,
    cache_dir: Optional[Path] = None,
    workers: int = 4,
    progress: bool = False,
) -> ImageCache:
    """Decode every path (in parallel) into an N x size x size x 3 uint8 array file, or reuse it."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache_dir.mkdir(parents=True, exist_ok=True)
    key = _cache_key(paths, size)
    array_path, info_path = cache_dir / f"{key}.npy", cache_dir / f"{key}.json"
    if array_path.is_file() and info_path.is_file():
        info = json.loads(info_path.read_text())
        if info.get("count") == len(paths):
            array = np.load(array_path, mmap_mode="r")
            return ImageCache(array, {int(k): v for k, v in info["failures"].items()}, info["conversions"], array_path)
    tmp_path = cache_dir / f"{key}.{os.getpid()}.tmp.npy"
    array = np.lib.format.open_memmap(tmp_path, mode="w+", dtype=np.uint8, shape=(len(paths), size, size, 3))
    failures: dict[int, str] = {}
    conversions: Counter = Counter()

    def work(i: int):
        if not paths[i]:
            return i, None, ["file absent"], True
        try:
            pixels, notes = decode_image(read(paths[i]), size)
            return i, pixels, notes, False
        except Exception as exc:  # PIL raises many types for bad files
            return i, None, [f"does not decode as an image ({type(exc).__name__}: {exc})"], True

    from tqdm.auto import tqdm

    from ..progress import bar_disable

    with MemberReader() as read, ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = pool.map(work, range(len(paths)))
        for i, pixels, notes, failed in tqdm(results, total=len(paths), desc="Decoding images",
                                             disable=bar_disable(progress), leave=False):
            if failed:
                failures[i] = notes[0]
            else:
                array[i] = pixels
                conversions.update(notes)
    array.flush()
    del array
    os.replace(tmp_path, array_path)
    # Per-process temporary names: processes started side by side (compare runs, DDP ranks) may
    # build the same cache at once; each writes its own file and the last rename wins.
    info_tmp = cache_dir / f"{key}.{os.getpid()}.tmp.json"
    info_tmp.write_text(json.dumps({"count": len(paths), "size": size, "failures": failures,
                                    "conversions": dict(conversions)}))
    os.replace(info_tmp, info_path)
    return ImageCache(np.load(array_path, mmap_mode="r"), failures, dict(conversions), array_path)


def train_transform(size: int, mean: float, std: float, augment: AugmentConfig) -> v2.Compose:
    """Per-sample augmentation of a uint8 C x H x W tensor, as the reference (rotation, jitter, flips)."""
    steps: list = []
    if augment.rotation_degrees > 0:
        steps.append(v2.RandomRotation(augment.rotation_degrees))
    if max(augment.brightness, augment.contrast, augment.saturation, augment.hue) > 0:
        steps.append(v2.ColorJitter(augment.brightness, augment.contrast, augment.saturation, augment.hue))
    if augment.hflip:
        steps.append(v2.RandomHorizontalFlip())
    if augment.vflip:
        steps.append(v2.RandomVerticalFlip())
    return v2.Compose(steps + [ModelInput(mean, std)])


class ModelInput(torch.nn.Module):
    """uint8 C x H x W -> the model's normalised float input, through the one conversion (preprocess)."""

    def __init__(self, mean: float, std: float):
        super().__init__()
        self.mean, self.std = mean, std

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return to_model_input(image.permute(1, 2, 0)[None], self.mean, self.std)[0]


def to_chw(pixels: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(pixels, copy=True)).permute(2, 0, 1)


@contextlib.contextmanager
def seeded_rng(seed: Optional[int]):
    """Inside: torch's global generator seeded for one item alone (restored after), so an item's
    augmentation does not depend on which worker made it, or on whether the workers lived through
    earlier epochs or the run was resumed. None: the generator as it is."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        yield


def item_seeds(seed: int, epoch: int, count: int, stream: int = 0) -> np.ndarray:
    """One augmentation seed per item of an epoch: a pure function of (run seed, epoch, stream, position)."""
    return np.random.default_rng([seed, epoch, stream]).integers(0, 2**62, size=count)


class CachedImages(torch.utils.data.Dataset):
    """Rows of the cache with their labels; returns (image tensor, label, row).

    A key is a position in `rows`, or (position, augmentation seed)."""

    def __init__(self, array: np.ndarray, rows: Sequence[int], labels: Sequence[int], transform):
        self.array, self.rows, self.labels, self.transform = array, np.asarray(rows), np.asarray(labels), transform

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key):
        i, seed = key if isinstance(key, tuple) else (key, None)
        row = int(self.rows[i])
        with seeded_rng(seed):
            image = self.transform(to_chw(self.array[row]))
        return image, int(self.labels[i]), row


class TripletImages(torch.utils.data.Dataset):
    """The reference's sampled triplets: anchor, positive (same class), negative; three images each.

    A key is (anchor row, positive row, negative row, augmentation seed): the triplets are drawn up front
    from a seeded generator (see `sample_triplets`) and reach the workers through the batch sampler
    (`EpochBatches`), so one DataLoader with persistent workers serves every epoch.
    """

    def __init__(self, array: np.ndarray, transform):
        self.array, self.transform = array, transform

    def __getitem__(self, key):
        *rows, seed = key
        with seeded_rng(seed):
            return tuple(self.transform(to_chw(self.array[int(r)])) for r in rows)


def triplet_keys(triplets: np.ndarray, seeds: np.ndarray) -> list[tuple[int, int, int, int]]:
    return [(int(a), int(p), int(n), int(s)) for (a, p, n), s in zip(triplets, seeds)]


class EpochBatches:
    """A DataLoader batch sampler whose batches of keys are set before each epoch, so one DataLoader,
    and its persistent workers, serves the whole run."""

    def __init__(self):
        self.batches: list[list] = []

    def set(self, batches: list[list]) -> None:
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def sample_triplets(rows: np.ndarray, labels: np.ndarray, count: int, balanced: bool,
                    rng: np.random.Generator) -> np.ndarray:
    """count x 3 cache rows (anchor, positive, negative). Balanced: anchors 50:50 melanoma/not."""
    by_class = {c: rows[labels == c] for c in (0, 1)}
    if balanced:
        anchor_class = rng.integers(0, 2, size=count)
    else:
        anchor_class = labels[rng.integers(0, len(labels), size=count)]
    out = np.empty((count, 3), dtype=np.int64)
    for c in (0, 1):
        idx = np.flatnonzero(anchor_class == c)
        same, other = by_class[c], by_class[1 - c]
        out[idx, 0] = rng.choice(same, size=len(idx))
        out[idx, 1] = rng.choice(same, size=len(idx))
        out[idx, 2] = rng.choice(other, size=len(idx))
    return out
