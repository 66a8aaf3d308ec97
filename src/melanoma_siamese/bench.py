"""`melanoma-siamese bench`: the speed and memory claims, measured side by side on the current machine.

Each comparison runs both sides in one process, one after the other, on the same generated data, so
its ratio holds on a noisy or shared machine even where the absolute figures do not. The CPU bench:
  1. input pipeline: the reference's way (per-sample PIL decode of the JPEG files and torchvision
     transforms in a triplet dataset, DataLoader workers) vs ours (uint8 memmap cache, batched tensor
     augmentation), in images delivered to the model per second;
  2. backbone passes per training image in one short epoch of each recipe, counted by a forward hook;
  3. embedding extraction from the cache vs the model-only forward pass on ready-made tensors;
  4. anonymous resident memory while training on the cache, at two dataset sizes (fresh processes).
`--gpu` measures training throughput on a CUDA GPU instead: ours with every switch on vs the bare
training step on tensors already on the GPU, and vs the reference's way on the same GPU.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional

import numpy as np
import torch

from .bench_rows import Row, log

MALLOC_HINT = "MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=100000000000"
GPU_WARMUP = 10  # training steps before the GPU clock starts (cuDNN autotuning, allocator growth)


def cmd_bench(args: argparse.Namespace) -> int:
    if args.gpu and not torch.cuda.is_available():
        print(f"error: bench --gpu needs a CUDA GPU, and this torch ({torch.__version__}) sees none "
              "(torch.cuda.is_available() is False). Run `melanoma-siamese bench` without --gpu to measure "
              "the CPU pipeline here.", file=sys.stderr)
        return 2
    problems = _check_args(args)
    if problems:
        print("error: " + "; ".join(problems), file=sys.stderr)
        return 2
    threads, why = (args.threads, "--threads") if args.threads else default_threads()
    workers = args.workers if args.workers is not None else usable_cores()
    log(f"torch threads: {threads} ({why}); reference DataLoader workers: {workers}")
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with _work_dir(args.work) as work:
            started = time.perf_counter()
            rows = run_gpu(args, work, workers) if args.gpu else run_cpu(args, work, threads, workers)
            seconds = time.perf_counter() - started
    finally:
        torch.set_num_threads(previous_threads)
    report = {"machine": {**machine_info(threads, "cuda" if args.gpu else "cpu"), "threads_reason": why,
                          "reference_workers": workers},
              "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                           if k != "handler"},
              "seconds": seconds, "rows": [asdict(r) for r in rows],
              "all_passed": all(r.passed for r in rows if r.passed is not None)}
    print(format_report(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
        print(f"Wrote {args.json}")
    return 0


def _check_args(args: argparse.Namespace) -> list[str]:
    problems = []
    if args.images < 16:
        problems.append(f"--images {args.images}: at least 16 are needed")
    if args.pass_images < 4 or args.pass_images % 4:
        problems.append(f"--pass-images {args.pass_images}: a multiple of 4 (two balanced reference batches)")
    if args.memory_scale < 4:
        problems.append(f"--memory-scale {args.memory_scale}: the two sizes must be at least 4x apart")
    if (args.threads is not None and args.threads < 1) or (args.workers is not None and args.workers < 0):
        problems.append("--threads must be at least 1 and --workers at least 0")
    for name in ("size", "pipeline_images", "embed_batch", "embed_batches", "memory_steps", "memory_batch",
                 "gpu_images", "gpu_batch", "gpu_reference_batches", "predict_images", "predict_batch",
                 "serve_requests"):
        if getattr(args, name) < 1:
            problems.append(f"--{name.replace('_', '-')} must be positive")
    if args.gpu and args.gpu_images // max(1, args.gpu_batch) <= GPU_WARMUP:
        problems.append(f"--gpu-images {args.gpu_images}: more than {GPU_WARMUP} batches of --gpu-batch "
                        f"{args.gpu_batch} are needed (the first {GPU_WARMUP} are warm-up)")
    if args.memory_batch % 2 or args.gpu_batch % 2:
        problems.append("--memory-batch and --gpu-batch must be even (class-balanced batches)")
    return problems


class _work_dir:
    """The given folder (kept), or a temporary one removed afterwards."""

    def __init__(self, path: Optional[Path]):
        self.path, self.tmp = path, None

    def __enter__(self) -> Path:
        if self.path is not None:
            self.path.mkdir(parents=True, exist_ok=True)
            return self.path
        self.tmp = tempfile.TemporaryDirectory(prefix="melanoma-bench-")
        return Path(self.tmp.name)

    def __exit__(self, *exc) -> None:
        if self.tmp is not None:
            self.tmp.cleanup()


def usable_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def default_threads() -> tuple[int, str]:
    """Intra-op threads: the usable cores that other work leaves idle, and why.

    On an oversubscribed machine every operator ends at a barrier that waits for a descheduled thread:
    measured with two threads on two busy cores, a small ResNet-18 forward took 50x longer than with one.
    """
    cores = usable_cores()
    if not hasattr(os, "getloadavg"):
        return cores, f"{cores} usable cores"
    load = os.getloadavg()[0]
    threads = max(1, min(cores, int(cores - load + 0.5)))
    if threads == cores:
        return threads, f"{cores} usable cores, load average {load:.1f}"
    return threads, (f"{cores} usable cores, but other work keeps the load average at {load:.1f}; more threads than "
                     "idle cores wait at every operator's barrier")


def _count(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


# ---------------------------------------------------------------------------------------------- timing


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


# ------------------------------------------------------------------------------- the reference's input


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


def _triplet_images(batch) -> int:
    return 3 * len(batch[0])


def _batch_images(batch) -> int:
    return len(batch[0])


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


# ------------------------------------------------------------------------------------------ CPU bench


@dataclass
class Data:
    paths: list[str]
    labels: np.ndarray
    array: np.ndarray  # the uint8 memmap cache
    cache_path: Path


def generate(work: Path, n: int, size: int, seed: int, threads: int) -> tuple[Data, float, float]:
    """JPEGs in the Kaggle layout and their cache; returns the data, generation and cache-build seconds."""
    import pandas as pd

    from .data.images import build_cache
    from .data.synth import make_synthetic_dataset

    data_dir = work / "data"
    start = time.perf_counter()
    if not (data_dir / "train-metadata.csv").is_file() or len(pd.read_csv(data_dir / "train-metadata.csv")) != n:
        log(f"generating {n} synthetic {size}x{size} JPEGs in {data_dir} ...")
        make_synthetic_dataset(data_dir, n, 0.25, size=size, seed=seed)
    generated = time.perf_counter() - start
    table = pd.read_csv(data_dir / "train-metadata.csv", dtype={"isic_id": str})
    paths = [str(data_dir / "train-image" / "image" / f"{i}.jpg") for i in table["isic_id"]]
    cache_dir = work / f"cache-{size}"
    for old in cache_dir.glob("*"):  # time a real build, not a reuse
        old.unlink()
    log(f"building the uint8 cache with {_count(threads, 'decoding thread')} ...")
    start = time.perf_counter()
    cache = build_cache(paths, size, cache_dir, workers=threads)
    built = time.perf_counter() - start
    if cache.failures:
        raise RuntimeError(f"{len(cache.failures)} generated images did not decode: {cache.failures}")
    return Data(paths, np.array(table["target"], dtype=np.int64), cache.array, cache.path), generated, built


def run_cpu(args: argparse.Namespace, work: Path, threads: int, workers: int) -> list[Row]:
    device = torch.device("cpu")
    data, generated, built = generate(work, args.images, args.size, args.seed, threads)
    rows = [Row("cache build (decode every JPEG once)", args.images / built, None, "images/s", None, "-", None,
                f"{built:.1f} s for {args.images} images ({generated:.0f} s to generate them); "
                f"{_count(threads, 'thread')}")]
    for measure in (lambda: input_pipelines(data, args, device, threads, workers),
                    lambda: passes_per_image(data, args, device), lambda: embedding_speed(data, args, device),
                    lambda: memory_flatness(data, args, work, threads),
                    lambda: inference_latency(data, args, work, threads),
                    lambda: serving(data.array, data.paths, args, work, "cpu")):
        start = time.perf_counter()
        found = measure()
        rows += found if isinstance(found, list) else [found]
        log(f"  {rows[-1].name}: {time.perf_counter() - start:.0f} s")
    return rows


def serving(array: np.ndarray, paths: list[str], args: argparse.Namespace, work: Path, device: str) -> list[Row]:
    """predict against model-only (both engines on a CPU, PyTorch on a GPU) and the server batched against one
    request per forward pass, on a run folder made for the bench (bench_serving)."""
    from .bench_serving import SERVE_LEVELS, batching_ceiling, bench_run, predict_speed, serve_speed

    if args.no_serving:
        return []
    run_dir = bench_run(work / "bench-run", array, args.backbone, args.seed)
    files = [paths[i % len(paths)] for i in range(args.predict_images)]
    from importlib.util import find_spec

    # onnxruntime runs the exported model on the CPU here: on a GPU machine only PyTorch is measured.
    engines = ["torch"] if device == "cuda" or find_spec("onnxruntime") is None else ["torch", "onnxruntime"]
    rows = []
    for engine in engines:
        log(f"predict: {len(files)} JPEG files through `predict`'s path vs the {engine} scorer alone, {device} ...")
        rows.append(predict_speed(run_dir, files, engine, device, args.predict_batch))
        log(f"measured: {rows[-1]}")
    log(f"model alone: a batch of {max(SERVE_LEVELS)} against one image per forward pass, {device} ...")
    rows.append(batching_ceiling(run_dir, np.asarray(array[:max(SERVE_LEVELS)]), device))
    with open(paths[0], "rb") as image:
        rows += serve_speed(run_dir, image.read(), work, device, args.serve_requests)
    log(f"measured: {rows[-5:]}")
    return rows


def inference_latency(data: Data, args: argparse.Namespace, work: Path, threads: int) -> Row:
    """Per-image CPU latency of the whole predictor (uint8 image in, probability out): onnxruntime vs PyTorch."""
    from .export import export_pixel_model
    from .inference import PixelModel
    from .models import Classifier, Encoder

    name = "per-image CPU latency, onnxruntime vs PyTorch"
    try:
        from .inference import onnx_scorer
        import onnxruntime  # noqa: F401
    except ImportError:
        return Row(name, float("nan"), None, "ms", None, "-", None, "onnxruntime is not installed (pip install onnxruntime)")
    log(f"latency: one image at a time through encoder + classifier, PyTorch and onnxruntime, {threads} thread(s) ...")
    torch.manual_seed(args.seed)
    model = PixelModel(Encoder(args.backbone, "none"), Classifier(), 0.5, 0.5).eval()
    path = export_pixel_model(model, args.size, work / "latency.onnx")
    session = onnx_scorer(path, threads=threads)
    images = [np.array(data.array[i:i + 1]) for i in range(min(12, len(data.array)))]

    def median_ms(run) -> float:
        run(images[0])  # warm-up
        times = []
        for image in images:
            start = time.perf_counter()
            run(image)
            times.append(time.perf_counter() - start)
        return 1000 * float(np.median(times))

    with torch.no_grad():
        torch_ms = median_ms(lambda image: model(torch.from_numpy(image)))
    onnx_ms = median_ms(session)
    return Row(name, onnx_ms, torch_ms, "ms", torch_ms / onnx_ms, "-", None,
               f"{args.backbone} at {args.size} px, batch 1, median of {len(images)} images; ratio = PyTorch / onnxruntime")


def input_pipelines(data: Data, args: argparse.Namespace, device: torch.device, threads: int, workers: int) -> Row:
    from .data.images import sample_triplets

    batch_triplets, batch = 32, 64
    ref_batches = max(1, workers) + math.ceil(args.pipeline_images / (3 * batch_triplets))
    rng = np.random.default_rng(args.seed)
    all_rows = np.arange(len(data.labels))
    triplets = sample_triplets(all_rows, data.labels, ref_batches * batch_triplets, True, rng)
    log(f"input pipeline, reference: PIL decode + torchvision transforms, triplets of {batch_triplets}, "
        f"{workers} DataLoader workers ...")
    loader = reference_loader(data.paths, triplets, args.size, batch_triplets, workers, args.seed)
    reference = drain(TimedBatches(loader, warmup=max(1, workers), count=_triplet_images))
    log(f"input pipeline, ours: memmap cache + batched augmentation, batches of {batch}, "
        f"{_count(threads, 'thread')} ...")
    source = our_source(data.array, all_rows, data.labels, args.size, device, batch=batch, seed=args.seed)
    batches = our_epoch(source, data.labels, batch, 1 + math.ceil(args.pipeline_images / batch), args.seed)
    ours = drain(TimedBatches(batches, warmup=1, count=_batch_images))
    return Row("input pipeline, images/s delivered to the model", ours, reference, "images/s", ours / reference,
               ">= 3x", ours / reference >= 3,
               f"reference: {workers} workers, 3 images per triplet, JPEGs of {mean_kib(data.paths):.0f} KiB on "
               f"average; ours: in-process, {_count(threads, 'thread')}")


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


def passes_per_image(data: Data, args: argparse.Namespace, device: torch.device) -> Row:
    rng = np.random.default_rng(args.seed)
    half = args.pass_images // 2
    by_class = [np.flatnonzero(data.labels == c) for c in (0, 1)]
    if min(len(r) for r in by_class) < half:
        raise RuntimeError(f"--pass-images {args.pass_images} needs {half} images of each class; the generated "
                           f"data has {len(by_class[0])} benign and {len(by_class[1])} melanoma")
    rows = np.sort(np.concatenate([rng.choice(r, half, replace=False) for r in by_class]))
    labels, array = data.labels[rows], data.array
    log(f"backbone passes: one short epoch of each recipe on {len(rows)} training images ...")
    reference = short_epoch_passes("reference", array, rows, labels, args.backbone, args.size, device, args.seed)
    ours = short_epoch_passes("ours", array, rows, labels, args.backbone, args.size, device, args.seed)
    return Row("backbone passes per training image per epoch", ours, reference, "passes", reference / ours,
               "ref 3, ours 1", math.isclose(reference, 3.0) and math.isclose(ours, 1.0),
               f"counted by a forward hook over one epoch of {len(rows)} images; ratio = reference / ours")


def embedding_speed(data: Data, args: argparse.Namespace, device: torch.device) -> Row:
    from .config import DataConfig
    from .engine import embed
    from .models import Encoder

    torch.manual_seed(args.seed)
    encoder = Encoder(args.backbone, "none", 512).to(device).eval()
    b = args.embed_batch
    order = np.random.default_rng(args.seed).permutation(len(data.labels))
    needed = b * (args.embed_batches + 1)
    order = np.resize(order, needed)
    mean, std = DataConfig().mean, DataConfig().std
    # Model-only input: the same images, already normalised, in the memory layout embed gives the model (a
    # permuted H x W x 3 batch is channels_last, which runs faster on a CPU than a contiguous one would).
    pixels = torch.from_numpy(np.asarray(data.array[np.sort(order[:b])]))
    ready = (pixels.permute(0, 3, 1, 2).to(device).float().div_(255) - mean) / std
    layout = "channels_last" if ready.is_contiguous(memory_format=torch.channels_last) else "contiguous"
    log(f"embedding: engine.embed from the cache vs the model-only forward, batch {b}, "
        f"{args.embed_batches} timed batches each (alternating) ...")
    with torch.no_grad():
        encoder(ready)  # warm-up of both
    embed(encoder, data.array, order[:b], mean, std, batch_size=b)
    model_only, from_cache = 0.0, 0.0
    for i in range(1, args.embed_batches + 1):
        start = time.perf_counter()
        with torch.no_grad():
            encoder(ready)
        model_only += time.perf_counter() - start
        start = time.perf_counter()
        embed(encoder, data.array, order[i * b:(i + 1) * b], mean, std, batch_size=b)
        from_cache += time.perf_counter() - start
    images = b * args.embed_batches
    ours, baseline = images / from_cache, images / model_only
    return Row("embedding extraction vs model-only forward", ours, baseline, "images/s", ours / baseline, ">= 0.9",
               ours / baseline >= 0.9,
               f"{args.backbone}, batch {b}, {images} images each side, no_grad, fp32, {layout} input on both sides")


def read_rss() -> dict[str, int]:
    """RssAnon and RssFile of this process in KiB (Linux), from /proc/self/status."""
    out = {}
    with open("/proc/self/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("RssAnon", "RssFile", "VmHWM"):
                out[key] = int(value.split()[0])
    return out


def memory_probe(cache_path: str, backbone: str, size: int, batch: int, steps: int, threads: int,
                 seed: int) -> dict:
    """Train `steps` steps of our recipe on a memory-mapped cache file; anonymous memory afterwards (KiB).

    Run in a fresh process per dataset size, so the two readings do not share a heap.
    """
    import gc

    from .batches import make_batch_source
    from .engine import train_siamese_epoch

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    device = torch.device("cpu")
    array = np.load(cache_path, mmap_mode="r")
    labels = (np.arange(len(array)) % 4 == 0).astype(np.int64)
    config = recipe_config("ours", backbone, size, batch, seed, epoch_images=batch * steps)
    stats = train_siamese_epoch(train_step(config, labels, device),
                                make_batch_source(config, array, np.arange(len(array)), labels, device).epoch(1))
    gc.collect()
    return {"images": len(array), "steps": stats["steps"], **read_rss()}


def tiled_cache(source: np.ndarray, path: Path, count: int) -> Path:
    """A cache file of `count` rows, the source rows repeated (no decoding, so a large size is quick)."""
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(count,) + source.shape[1:])
    for start in range(0, count, len(source)):
        stop = min(count, start + len(source))
        out[start:stop] = source[:stop - start]
    out.flush()
    del out
    return path


def run_probe(cache_path: Path, args: argparse.Namespace, threads: int) -> dict:
    kwargs = {"cache_path": str(cache_path), "backbone": args.backbone, "size": args.size,
              "batch": args.memory_batch, "steps": args.memory_steps, "threads": threads, "seed": args.seed}
    code = ("import json, sys; from melanoma_siamese.bench import memory_probe; "
            "print(json.dumps(memory_probe(**json.loads(sys.argv[1]))))")
    done = subprocess.run([sys.executable, "-c", code, json.dumps(kwargs)], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"the memory probe on {cache_path} failed (exit {done.returncode}):\n"
                           f"{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def memory_flatness(data: Data, args: argparse.Namespace, work: Path, threads: int) -> Row:
    if not Path("/proc/self/status").is_file():
        return Row("anonymous memory, training on the cache", float("nan"), None, "MiB", None, "flat (<= 1.25x)",
                   None, "not measured: /proc/self/status (Linux) is not available")
    large_count = args.images * args.memory_scale
    large = tiled_cache(data.array, work / f"cache-x{args.memory_scale}.npy", large_count)
    log(f"memory: {args.memory_steps} training steps of batch {args.memory_batch} in fresh processes, on caches of "
        f"{args.images} and {large_count} images ...")
    try:
        small_rss = run_probe(data.cache_path, args, threads)
        large_rss = run_probe(large, args, threads)
    finally:
        large.unlink(missing_ok=True)
    small_mib, large_mib = small_rss["RssAnon"] / 1024, large_rss["RssAnon"] / 1024
    ratio = large_mib / small_mib
    mib = data.array[0].nbytes / 2**20
    return Row(f"anonymous RSS at {large_count} vs {args.images} images", large_mib, small_mib, "MiB", ratio,
               "<= 1.25x", ratio <= 1.25,
               f"RssAnon after {args.memory_steps} steps; the caches are {args.images * mib:,.0f} and "
               f"{large_count * mib:,.0f} MiB (file-backed RSS {small_rss['RssFile'] / 1024:.0f} and "
               f"{large_rss['RssFile'] / 1024:.0f} MiB)")


# ------------------------------------------------------------------------------------------ GPU bench


def synthetic_uint8(n: int, size: int, device: torch.device, seed: int, chunk: int = 512) -> np.ndarray:
    """n x size x size x 3 uint8 lesion-like images made on `device` (an ellipse on skin, with noise):
    a training cache without JPEG files or decoding."""
    generator = torch.Generator(device=device).manual_seed(seed)
    out = np.empty((n, size, size, 3), dtype=np.uint8)
    axis = (torch.arange(size, device=device, dtype=torch.float32) + 0.5) / size
    yy, xx = torch.meshgrid(axis, axis, indexing="ij")

    def rand(*shape):
        return torch.rand(*shape, device=device, generator=generator)

    for start in range(0, n, chunk):
        b = min(chunk, n - start)
        skin = torch.tensor([0.85, 0.65, 0.55], device=device) + 0.05 * (rand(b, 3) - 0.5)
        lesion = torch.tensor([0.45, 0.28, 0.18], device=device) * (0.6 + 0.6 * rand(b, 1)) + 0.08 * (rand(b, 3) - 0.5)
        cy, cx = (0.35 + 0.3 * rand(b, 2)).unbind(1)
        ry, rx = (0.14 + 0.16 * rand(b, 2)).unbind(1)
        angle = math.pi * rand(b)
        dy, dx = yy - cy.view(b, 1, 1), xx - cx.view(b, 1, 1)
        cos, sin = torch.cos(angle).view(b, 1, 1), torch.sin(angle).view(b, 1, 1)
        u, v = (dx * cos + dy * sin) / rx.view(b, 1, 1), (-dx * sin + dy * cos) / ry.view(b, 1, 1)
        inside = (u * u + v * v < 1).unsqueeze(-1)
        image = torch.where(inside, lesion.view(b, 1, 1, 3), skin.view(b, 1, 1, 3))
        image = image + 0.04 * (rand(b, size, size, 3) - 0.5)
        out[start:start + b] = (image.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    return out


def write_jpegs(array: np.ndarray, folder: Path, threads: int) -> list[str]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = [str(folder / f"{i:06d}.jpg") for i in range(len(array))]

    def save(i: int) -> None:
        Image.fromarray(np.asarray(array[i])).save(paths[i], quality=95)

    with ThreadPoolExecutor(max_workers=threads) as pool:
        list(pool.map(save, range(len(array))))
    return paths


@dataclass
class GpuRun:
    """What the GPU measurements share: the data, and the settings train would use on this device."""
    args: argparse.Namespace
    device: torch.device
    array: np.ndarray
    labels: np.ndarray
    sync: Callable[[], None]

    def config(self, recipe: str, batch: int):
        return recipe_config(recipe, self.args.backbone, self.args.size, batch, self.args.seed)

    def train(self, step, batches: Iterable) -> None:
        from .engine import train_siamese_epoch

        train_siamese_epoch(step, batches)


def _gpu_ours(g: GpuRun) -> dict:
    """Model-only step, ours end to end, our input alone, and host waits per batch of our input."""
    args, device, batch, warmup = g.args, g.device, g.args.gpu_batch, GPU_WARMUP
    config = g.config("ours", batch)
    step = train_step(config, g.labels, device)
    precision = step.precision
    log(f"GPU, model-only: the training step on random tensors already on the GPU, batch {batch}, "
        f"{precision.name} ...")
    images = precision.layout(torch.randn(batch, 3, args.size, args.size, device=device))
    fixed = (images, torch.arange(batch, device=device) % 2)
    steps = max(warmup + 20, min(len(g.array) // batch, warmup + 60))
    timed = TimedBatches((fixed for _ in range(steps)), warmup, _batch_images, g.sync)
    g.train(step, timed)
    out = {"model_only": timed.rate, "precision": precision.name}
    log(f"GPU, ours: one epoch of {len(g.array)} images, GPU-resident cache, batched GPU augmentation, "
        f"{precision.name} ...")
    source = our_source(g.array, np.arange(len(g.array)), g.labels, args.size, device, precision.channels_last,
                        batch, args.seed)
    out["resident"] = ("GPU-resident cache" if source.on_device is not None else "cache streamed from pinned memory")
    step = train_step(config, g.labels, device)
    timed = TimedBatches(our_epoch(source, g.labels, batch, len(g.array) // batch, args.seed), warmup,
                         _batch_images, g.sync)
    g.train(step, timed)
    out["ours"] = timed.rate
    del step
    # Our input alone (gather + augment, nothing trained): is it a throughput limit or only serialised?
    out["input_only"] = drain(TimedBatches(our_epoch(source, g.labels, batch, warmup + 40, args.seed + 1), warmup,
                                           _batch_images, g.sync))
    out["syncs"] = (host_syncs_per_batch(our_epoch(source, g.labels, batch, 30, args.seed + 2), 5, 20)
                    if device.type == "cuda" else None)
    log(f"measured: {out}")
    return out


def _gpu_compiled(g: GpuRun) -> dict:
    """Model-only and ours again with the training module under torch.compile (as runtime.compile), compiled
    during the warm-up; how long the compilation and warm-up took. Measured last: compiling takes longest."""
    from .runtime import precision_for

    args, batch, warmup = g.args, g.args.gpu_batch, GPU_WARMUP
    config = g.config("ours", batch)
    source = our_source(g.array, np.arange(len(g.array)), g.labels, args.size, g.device,
                        precision_for(config.runtime, g.device).channels_last, batch, args.seed)
    steps = max(warmup + 20, min(len(g.array) // batch, warmup + 60))
    log(f"GPU, torch.compile: compiling the training step during the {warmup} warm-up steps ...")
    step = train_step(config, g.labels, g.device)
    step.model = torch.compile(step.model)
    images = step.precision.layout(torch.randn(batch, 3, args.size, args.size, device=g.device))
    fixed = (images, torch.arange(batch, device=g.device) % 2)
    start = time.perf_counter()
    timed = TimedBatches((fixed for _ in range(steps)), warmup, _batch_images, g.sync)
    g.train(step, timed)
    out = {"compiled_model_only": timed.rate, "compile_seconds": time.perf_counter() - start - timed.seconds}
    log(f"GPU, torch.compile: compiled and warmed up in {out['compile_seconds']:.0f} s; ours, one epoch ...")
    timed = TimedBatches(our_epoch(source, g.labels, batch, len(g.array) // batch, args.seed), warmup,
                         _batch_images, g.sync)
    g.train(step, timed)
    out["compiled_ours"] = timed.rate
    log(f"measured: {out}")
    return out


def _gpu_reference(g: GpuRun, work: Path, workers: int) -> dict:
    """The reference's model-only step and the reference's way end to end (JPEGs, PIL, workers, fp32)."""
    from .data.images import sample_triplets

    args, device, size, warmup = g.args, g.device, g.args.size, GPU_WARMUP
    log("GPU, the reference's model-only step: fp32, 32 random triplets already on the GPU ...")
    step = train_step(g.config("reference", 32), g.labels, device)
    triplet = tuple(torch.randn(32, 3, size, size, device=device) for _ in range(3))
    timed = TimedBatches((triplet for _ in range(warmup + 30)), warmup, _triplet_images, g.sync)
    g.train(step, stacked_triplets(timed, device))
    out = {"reference_model_only": timed.rate}
    del step, triplet
    reference_images = min(len(g.array), 4000)
    log(f"GPU, reference's way: writing {reference_images} JPEGs, then PIL + torchvision per sample, "
        f"{workers} DataLoader workers, 32 triplets a batch, fp32 ...")
    paths = write_jpegs(g.array[:reference_images], work / "jpeg", max(1, workers))
    triplet_batches = workers + warmup + args.gpu_reference_batches
    triplets = sample_triplets(np.arange(reference_images), g.labels[:reference_images], 32 * triplet_batches, True,
                               np.random.default_rng(args.seed))
    step = train_step(g.config("reference", 32), g.labels, device)
    loader = reference_loader(paths, triplets, size, 32, workers, args.seed, pin_memory=True)
    timed = TimedBatches(loader, workers + warmup, _triplet_images, g.sync)
    g.train(step, stacked_triplets(timed, device))
    out.update(reference=timed.rate, jpeg_kib=mean_kib(paths))
    return out


def run_gpu(args: argparse.Namespace, work: Path, workers: int, device: torch.device = torch.device("cuda")
            ) -> list[Row]:
    """Training throughput on the GPU (`device` is a parameter only so the code path can be tried on a CPU)."""
    on_gpu = device.type == "cuda"
    gpu_name = torch.cuda.get_device_name(device) if on_gpu else str(device)
    n, size = args.gpu_images, args.size
    log(f"GPU: {gpu_name}; generating a uint8 cache of {n} {size}x{size} images on it ...")
    start = time.perf_counter()
    array = synthetic_uint8(n, size, device, args.seed)
    made = time.perf_counter() - start
    labels = (np.random.default_rng(args.seed).random(n) < 0.25).astype(np.int64)
    rows = [Row("uint8 cache generated on the GPU", n / made, None, "images/s", None, "-", None,
                f"{n} images at {size} px ({array.nbytes / 2**30:.1f} GiB) in {made:.1f} s, no JPEG files")]
    g = GpuRun(args, device, array, labels, torch.cuda.synchronize if on_gpu else (lambda: None))
    m = _gpu_ours(g)
    m.update(_gpu_reference(g, work, workers))
    log(f"measured: {m}")
    rows += _gpu_rows(args, workers, m)
    if not args.no_compile:  # before serving: it is the training question, and serving needs more packages
        try:
            m.update(_gpu_compiled(g))
            rows += _compile_rows(args, m)
        except Exception as exc:  # the rows above still stand; say why these are missing
            log(f"torch.compile failed: {type(exc).__name__}: {exc}")
            rows.append(Row("training under torch.compile", float("nan"), None, "images/s", None, "-", None,
                            f"failed: {type(exc).__name__}: {str(exc)[:300]}"))
    if not args.no_serving:
        count = min(len(array), args.predict_images)
        paths = write_jpegs(array[:count], work / "predict-jpeg", max(1, workers))
        try:
            rows += serving(array, paths, args, work, device.type)
        except Exception as exc:  # a server that cannot start (a missing package) costs its rows, not the bench
            log(f"prediction/serving rows failed: {type(exc).__name__}: {str(exc)[-600:]}")
            rows.append(Row("prediction and serving on the GPU", float("nan"), None, "images/s", None, "-", None,
                            f"failed: {type(exc).__name__}: {str(exc)[-300:]}"))
    return rows


def _compile_rows(args: argparse.Namespace, m: dict) -> list[Row]:
    if "compiled_ours" not in m:
        return []
    compiled, model_only, eager = m["compiled_ours"], m["compiled_model_only"], m["ours"]
    note = f"{args.backbone}, batch {args.gpu_batch}, {m['precision']}; compiled and warmed up in " \
           f"{m['compile_seconds']:.0f} s (not timed)"
    return [Row("training images/s under torch.compile, all switches on vs model-only step", compiled, model_only,
                "images/s", compiled / model_only, ">= 0.95", compiled / model_only >= 0.95, note),
            Row("model-only step, torch.compile vs eager", model_only, m["model_only"], "images/s",
                model_only / m["model_only"], "-", None, note),
            Row("training images/s, ours, torch.compile vs eager", compiled, eager, "images/s", compiled / eager,
                "-", None, "above 1: compiling wins end to end")]


def _gpu_rows(args: argparse.Namespace, workers: int, m: dict) -> list[Row]:
    ours, model_only, reference, input_only = m["ours"], m["model_only"], m["reference"], m["input_only"]
    batch, precision, resident, syncs = args.gpu_batch, m["precision"], m["resident"], m["syncs"]
    reference_model_only = m["reference_model_only"]
    rows = []
    rows.append(Row("training images/s, all switches on vs model-only step", ours, model_only, "images/s",
                    ours / model_only, ">= 0.95", ours / model_only >= 0.95,
                    f"{args.backbone}, batch {batch}, {precision}, {resident}, batched GPU augmentation; "
                    "model-only: the same step (loss, miner, optimizer) on one random batch already on the GPU"))
    # Per distinct training image: the reference passes each image three times (anchor, positive, negative).
    distinct = reference / 3
    rows.append(Row("distinct training images/s, ours vs the reference's way", ours, distinct, "images/s",
                    ours / distinct, ">= 3x", ours / distinct >= 3,
                    f"reference: {workers} workers, PIL + torchvision per sample, JPEGs of {m['jpeg_kib']:.0f} KiB "
                    f"on average, fp32, {reference:,.0f} images/s through the backbone (3 passes per triplet)"))
    rows.append(Row("our input alone (gather + augment on the GPU)", input_only, ours, "images/s",
                    input_only / ours, "-", None, "baseline: ours training; a high ratio means the input costs time "
                    "by running in series with the step, not by its throughput"))
    rows.append(Row("host waits for the GPU per batch of our input", syncs, None, "syncs/batch", None, "0",
                    None if syncs is None else syncs == 0,
                    "CUDA sync debug mode while gathering and augmenting: each wait drains the GPU queue and "
                    "exposes the launch time of the next step's kernels"))
    rows.append(Row("reference's way vs its own model-only step (fp32)", reference, reference_model_only, "images/s",
                    reference / reference_model_only, "-", None,
                    "below 1: the reference is input-bound; near 1: its fp32 step, not its input, limits it"))
    return rows


# ----------------------------------------------------------------------------------------- reporting


def machine_info(threads: int, device: str) -> dict:
    import torchvision

    info = {
        "cpu_count": os.cpu_count(), "usable_cores": usable_cores(), "torch_threads": threads,
        "processor": platform.processor() or platform.machine(), "python": platform.python_version(),
        "torch": torch.__version__, "torchvision": torchvision.__version__, "device": device,
        "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    if hasattr(os, "getloadavg"):
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    return info


def _number(value: Optional[float]) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def format_report(report: dict) -> str:
    m = report["machine"]
    lines = [f"Machine: {m['cpu_count']} CPUs ({m['usable_cores']} usable), {m['processor']}, Python {m['python']}, "
             f"torch {m['torch']}, torchvision {m['torchvision']}, device {m['device']}"
             + (f" ({m['gpu']})" if m.get("gpu") else "")]
    lines.append(f"torch threads: {m['torch_threads']} ({m['threads_reason']}); reference DataLoader workers: "
                 f"{m['reference_workers']}"
                 + (f"; load average at the end: {' '.join(str(x) for x in m['load_average'])}"
                    if "load_average" in m else ""))
    if m["malloc_env"]:
        lines.append("MALLOC_* set: " + " ".join(f"{k}={v}" for k, v in m["malloc_env"].items()))
    else:
        lines.append(f"MALLOC_* not set: on a VM that returns freed memory to its host, large batch tensors pay a "
                     f"slow first write on every batch; `{MALLOC_HINT}` in the environment avoids it")
    if m["device"] == "cpu":
        lines.append("fp32 on CPU (bf16 autocast on a CPU without native bf16 is slower); compare ratios, not "
                     "absolute figures, on a busy machine")
    header = ("measurement", "ours", "baseline", "unit", "ratio", "target", "result")
    table = [header]
    for r in report["rows"]:
        result = "-" if r["passed"] is None else ("PASS" if r["passed"] else "MISS")
        table.append((r["name"], _number(r["ours"]), _number(r["baseline"]), r["unit"],
                      "-" if r["ratio"] is None else f"{r['ratio']:.2f}", r["target"], result))
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines.append("")
    for i, row in enumerate(table):
        lines.append("  ".join(cell.ljust(w) if j == 0 else cell.rjust(w)
                               for j, (cell, w) in enumerate(zip(row, widths))))
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines.append("")
    lines += [f"  {r['name']}: {r['note']}" for r in report["rows"] if r["note"]]
    lines.append(f"Bench took {report['seconds']:.0f} s.")
    return "\n".join(lines)
