"""bench's memory row: anonymous resident memory while training on the uint8 cache at two dataset sizes,
each read in a fresh process so the two readings do not share a heap.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from .bench_rows import Row, log
from .bench_training import recipe_config, train_step


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
    code = ("import json, sys; from melanoma_siamese.bench_memory import memory_probe; "
            "print(json.dumps(memory_probe(**json.loads(sys.argv[1]))))")
    done = subprocess.run([sys.executable, "-c", code, json.dumps(kwargs)], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"the memory probe on {cache_path} failed (exit {done.returncode}):\n"
                           f"{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def memory_flatness(array: np.ndarray, cache_path: Path, args: argparse.Namespace, work: Path, threads: int) -> Row:
    if not Path("/proc/self/status").is_file():
        return Row("anonymous memory, training on the cache", float("nan"), None, "MiB", None, "flat (<= 1.25x)",
                   None, "not measured: /proc/self/status (Linux) is not available")
    large_count = args.images * args.memory_scale
    large = tiled_cache(array, work / f"cache-x{args.memory_scale}.npy", large_count)
    log(f"memory: {args.memory_steps} training steps of batch {args.memory_batch} in fresh processes, on caches of "
        f"{args.images} and {large_count} images ...")
    try:
        small_rss = run_probe(cache_path, args, threads)
        large_rss = run_probe(large, args, threads)
    finally:
        large.unlink(missing_ok=True)
    small_mib, large_mib = small_rss["RssAnon"] / 1024, large_rss["RssAnon"] / 1024
    ratio = large_mib / small_mib
    mib = array[0].nbytes / 2**20
    return Row(f"anonymous RSS at {large_count} vs {args.images} images", large_mib, small_mib, "MiB", ratio,
               "<= 1.25x", ratio <= 1.25,
               f"RssAnon after {args.memory_steps} steps; the caches are {args.images * mib:,.0f} and "
               f"{large_count * mib:,.0f} MiB (file-backed RSS {small_rss['RssFile'] / 1024:.0f} and "
               f"{large_rss['RssFile'] / 1024:.0f} MiB)")

