"""`bench --gpu`: training throughput on a CUDA GPU. Ours with every switch on against the bare training step
on tensors already on the GPU (eager and under torch.compile), against the reference's way on the same GPU,
then prediction and serving on the GPU.
"""
from __future__ import annotations

import argparse
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch

from .bench_rows import Row, log
from .bench_serving import serving
from .bench_training import (TimedBatches, batch_images, drain, host_syncs_per_batch, mean_kib, our_epoch,
                             our_source, recipe_config, reference_loader, stacked_triplets, train_step,
                             triplet_images)

GPU_WARMUP = 10  # training steps before the GPU clock starts (cuDNN autotuning, allocator growth)


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
    timed = TimedBatches((fixed for _ in range(steps)), warmup, batch_images, g.sync)
    g.train(step, timed)
    out = {"model_only": timed.rate, "precision": precision.name}
    log(f"GPU, ours: one epoch of {len(g.array)} images, GPU-resident cache, batched GPU augmentation, "
        f"{precision.name} ...")
    source = our_source(g.array, np.arange(len(g.array)), g.labels, args.size, device, precision.channels_last,
                        batch, args.seed)
    out["resident"] = ("GPU-resident cache" if source.on_device is not None else "cache streamed from pinned memory")
    step = train_step(config, g.labels, device)
    timed = TimedBatches(our_epoch(source, g.labels, batch, len(g.array) // batch, args.seed), warmup,
                         batch_images, g.sync)
    g.train(step, timed)
    out["ours"] = timed.rate
    del step
    # Our input alone (gather + augment, nothing trained): is it a throughput limit or only serialised?
    out["input_only"] = drain(TimedBatches(our_epoch(source, g.labels, batch, warmup + 40, args.seed + 1), warmup,
                                           batch_images, g.sync))
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
    timed = TimedBatches((fixed for _ in range(steps)), warmup, batch_images, g.sync)
    g.train(step, timed)
    out = {"compiled_model_only": timed.rate, "compile_seconds": time.perf_counter() - start - timed.seconds}
    log(f"GPU, torch.compile: compiled and warmed up in {out['compile_seconds']:.0f} s; ours, one epoch ...")
    timed = TimedBatches(our_epoch(source, g.labels, batch, len(g.array) // batch, args.seed), warmup,
                         batch_images, g.sync)
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
    timed = TimedBatches((triplet for _ in range(warmup + 30)), warmup, triplet_images, g.sync)
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
    timed = TimedBatches(loader, workers + warmup, triplet_images, g.sync)
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

