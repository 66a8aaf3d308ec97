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
This module runs the command and the CPU rows; the parts live beside it: bench_training (each recipe's input
and training step, the reference's loader, the timer), bench_memory, bench_gpu, bench_serving (predict and
serve on a run folder it makes), bench_rows (the row and the log).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .allocator import allocator_tunable
from .bench_gpu import GPU_WARMUP, run_gpu
from .bench_memory import memory_flatness
from .bench_rows import Row, log
from .bench_serving import serving
from .bench_training import (TimedBatches, batch_images, drain, mean_kib, our_epoch, our_source,
                             reference_loader, short_epoch_passes, triplet_images)

MALLOC_HINT = "MALLOC_MMAP_MAX_=0 MALLOC_ARENA_MAX=1 MALLOC_TRIM_THRESHOLD_=100000000000"


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
                    lambda: memory_flatness(data.array, data.cache_path, args, work, threads),
                    lambda: inference_latency(data, args, work, threads),
                    lambda: serving(data.array, data.paths, args, work, "cpu")):
        start = time.perf_counter()
        found = measure()
        rows += found if isinstance(found, list) else [found]
        log(f"  {rows[-1].name}: {time.perf_counter() - start:.0f} s")
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
    reference = drain(TimedBatches(loader, warmup=max(1, workers), count=triplet_images))
    log(f"input pipeline, ours: memmap cache + batched augmentation, batches of {batch}, "
        f"{_count(threads, 'thread')} ...")
    source = our_source(data.array, all_rows, data.labels, args.size, device, batch=batch, seed=args.seed)
    batches = our_epoch(source, data.labels, batch, 1 + math.ceil(args.pipeline_images / batch), args.seed)
    ours = drain(TimedBatches(batches, warmup=1, count=batch_images))
    return Row("input pipeline, images/s delivered to the model", ours, reference, "images/s", ours / reference,
               ">= 3x", ours / reference >= 3,
               f"reference: {workers} workers, 3 images per triplet, JPEGs of {mean_kib(data.paths):.0f} KiB on "
               f"average; ours: in-process, {_count(threads, 'thread')}")


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


# ----------------------------------------------------------------------------------------- reporting


def machine_info(threads: int, device: str) -> dict:
    import torchvision

    info = {
        "cpu_count": os.cpu_count(), "usable_cores": usable_cores(), "torch_threads": threads,
        "processor": platform.processor() or platform.machine(), "python": platform.python_version(),
        "torch": torch.__version__, "torchvision": torchvision.__version__, "device": device,
        "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
        "allocator_tuned": allocator_tunable(),
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
    elif m.get("allocator_tuned"):
        lines.append("MALLOC_* not set: the command kept freed memory in one heap itself, as "
                     f"`{MALLOC_HINT}` would (allocator.keep_freed_memory)")
    else:
        lines.append("MALLOC_* not set, and no glibc here to tune: the allocator's own policy")
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
