"""bench's rows for a trained model put to use: `predict` on a folder of JPEG files against the engine's own
forward pass, and the server's requests per second and latency with 1, 8 and 32 concurrent clients, batched
against one request per forward pass, through real uvicorn on loopback.

Both run on a run folder made for the bench (random weights, a retrieval index of random embeddings with the
training images' appearance descriptors): speed does not depend on what the weights learned.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from .bench_rows import Row, log

SERVE_LEVELS = (1, 8, 32)


def bench_run(folder: Path, array: np.ndarray, backbone: str, seed: int, index_images: int = 2000) -> Path:
    """A run folder `predict` and `serve` load: configuration, random models, an index (80% train, 20% val)."""
    from .checkpoint import save_model
    from .config import Config, DataConfig, ModelConfig, dump_yaml
    from .familiarity import appearance_features
    from .models import Classifier, Encoder
    from .runfolder import RunFolder, write_text_atomic

    run = RunFolder(folder).make()
    size = array.shape[1]
    write_text_atomic(run.config, dump_yaml(Config(data=DataConfig(image_size=size),
                                                   model=ModelConfig(backbone, "none", 512))))
    torch.manual_seed(seed)
    save_model(Encoder(backbone, "none", 512), run.siamese)
    save_model(Classifier(512), run.classifier)
    rng = np.random.default_rng(seed)
    n = min(index_images, len(array))
    embeddings = rng.standard_normal((n, 512)).astype(np.float32)
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    parts = np.where(np.arange(n) < 0.8 * n, "train", "val")
    run.write_index(embeddings, np.array([f"BENCH_{i:07d}" for i in range(n)]), (rng.random(n) < 0.25).astype(int),
                    parts, appearance_features(np.asarray(array[:n])))
    return folder


def _predictor(run_dir: Path, engine: str, device: str, batch: int):
    from .export import describe_model, export_onnx, score_metadata
    from .inference import Predictor, load_run

    run = load_run(run_dir, device)
    if engine == "onnxruntime" and not run.folder.onnx.is_file():
        describe_model(export_onnx(run, run.folder.onnx), score_metadata(run))  # as `export` writes it
    return Predictor(run, engine, batch_size=batch)


def alternating_seconds(sides: dict[str, Callable[[], None]], repeats: int) -> dict[str, float]:
    """Total seconds of each side, run one after the other `repeats` times (alternating, so a noisy machine
    slows both sides alike)."""
    times = dict.fromkeys(sides, 0.0)
    for _ in range(repeats):
        for name, side in sides.items():
            start = time.perf_counter()
            side()
            times[name] += time.perf_counter() - start
    return times


def predict_speed(run_dir: Path, paths: Sequence[str], engine: str, device: str, batch: int,
                  repeats: int = 2) -> list[Row]:
    """`predict` (decode the files, score, describe each answer) against the engine's scorer alone on the same
    images already decoded in memory, alternating `repeats` times; and, as a third side, predict with the
    model's work left out (its scorer answers at once with embeddings it made before): how fast decoding and
    describing go on their own, the most predict can reach on this machine whatever runs the model."""
    import copy

    from .inference import decoded_chunks, predict_paths

    predictor = _predictor(run_dir, engine, device, batch)
    run = predictor.run
    size = run.config.data.image_size
    pixels = np.stack([p for chunk in decoded_chunks(list(map(Path, paths)), batch, size, 10**9)
                       for p, _ in chunk[1]])
    sync = torch.cuda.synchronize if run.device.type == "cuda" else (lambda: None)
    # The first calls pay one-time costs (allocations, thread pools); their answers serve the model-free side.
    made = predictor.score(pixels[:batch])
    model_free = copy.copy(predictor)
    model_free.score = lambda images: tuple(np.resize(part, (len(images), *part.shape[1:])) for part in made)

    def model_only() -> None:
        for start in range(0, len(pixels), batch):
            predictor.score(pixels[start:start + batch])
        sync()

    def predicting(p) -> Callable[[], None]:
        def predict() -> None:
            rows = predict_paths(p, [Path(f) for f in paths], batch_size=batch)
            assert all(r["status"] == "ok" for r in rows), "a generated image failed to decode"
        return predict

    predict_paths(predictor, [Path(p) for p in paths[:batch]], batch_size=batch)
    times = alternating_seconds({"model": model_only, "predict": predicting(predictor), "free": predicting(model_free)},
                                repeats)
    ours, model, free = (repeats * len(paths) / times[k] for k in ("predict", "model", "free"))
    where = "GPU" if run.device.type == "cuda" else "CPU"
    what = f"{run.encoder.args['backbone']} at {size} px, batch {batch}"
    return [Row(f"predict on {len(paths)} JPEG files vs model-only, {engine}, {where}", ours, model, "images/s",
                ours / model, ">= 0.8", ours / model >= 0.8,
                f"{what}; predict decodes the files in threads while the model scores the chunk before, then "
                "describes each answer (kNN vote, neighbours, unfamiliar check); model-only: the engine's scorer on "
                "the same images already decoded"),
            Row(f"predict's own work (model left out) vs model-only, {engine}, {where}", free, model, "images/s",
                free / model, "-", None,
                f"{what}; decoding and describing alone on this machine's CPU: predict cannot be faster than this "
                "on any device, and reaches 0.8 of model-only only where this is well above 1")]


def batching_ceiling(run_dir: Path, pixels: np.ndarray, device: str, repeats: int = 2) -> Row:
    """The model alone: one forward pass over len(pixels) images against one pass per image, alternating. No
    server can gain more from batching than this on the same device, so it is the ceiling of the serve rows."""
    predictor = _predictor(run_dir, "torch", device, len(pixels))
    sync = torch.cuda.synchronize if predictor.run.device.type == "cuda" else (lambda: None)
    def batched() -> None:
        predictor.score(pixels)
        sync()

    def single() -> None:
        for i in range(len(pixels)):
            predictor.score(pixels[i:i + 1])
        sync()

    predictor.score(pixels)  # warm-up of both
    predictor.score(pixels[:1])
    times = alternating_seconds({"batched": batched, "single": single}, repeats)
    n = repeats * len(pixels)
    batched, single = n / times["batched"], n / times["single"]
    where = "GPU" if predictor.run.device.type == "cuda" else "CPU"
    return Row(f"model alone, batch of {len(pixels)} vs one image per pass, {where}", batched, single, "images/s",
               batched / single, "-", None, "encoder + classifier, no server: the most any batching server can "
               "gain over one request per forward pass on this device (the serve rows' ceiling)")


@contextlib.contextmanager
def serve_process(run_dir: Path, log_path: Path, *options: str) -> Iterator[str]:
    """`melanoma-siamese serve` on a free loopback port in its own process, once its health check answers."""
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with open(log_path, "w") as out:
        server = subprocess.Popen([sys.executable, "-m", "melanoma_siamese", "serve", "--run", str(run_dir),
                                   "--port", str(port), "--quiet", *options], stdout=out, stderr=subprocess.STDOUT)
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.time() + 180
            while True:
                if server.poll() is not None:
                    raise RuntimeError(f"serve exited ({server.returncode}): {Path(log_path).read_text()[-2000:]}")
                try:
                    if httpx.get(base + "/api/health", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.time() > deadline:
                    raise RuntimeError("serve did not answer its health check in 180 s")
                time.sleep(0.3)
            yield base
        finally:
            server.terminate()
            server.wait(timeout=30)


async def _load(base: str, data: bytes, clients: int, total: int) -> tuple[float, list[float]]:
    """`total` uploads by `clients` concurrent clients, each sending its next as soon as it has its answer:
    requests per second and each request's seconds."""
    import httpx

    latencies: list[float] = []
    numbers = iter(range(total))
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=base, timeout=600, limits=limits) as http:
        async def client() -> None:
            for _ in numbers:
                start = time.perf_counter()
                answer = await http.post("/api/predict", files={"file": ("lesion.jpg", data, "image/jpeg")})
                if answer.status_code != 200:
                    raise RuntimeError(f"the server answered {answer.status_code}: {answer.text[:300]}")
                latencies.append(time.perf_counter() - start)

        start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        return total / (time.perf_counter() - start), latencies


def serve_speed(run_dir: Path, data: bytes, work: Path, device: str, requests: int,
                levels: Sequence[int] = SERVE_LEVELS, rounds: int = 4) -> list[Row]:
    """Both servers up side by side (batched, and one request per forward pass); at each level of concurrency
    they take turns, up to `rounds` each (one first, then the other first), so that what drifts on the machine
    during a level falls on both alike. Each turn starts with one untimed request per client."""
    measured: dict[str, dict[int, tuple[float, list[float]]]] = {"batched": {}, "single": {}}
    with serve_process(run_dir, work / "serve-batched.log", "--device", device, "--max-batch", "32") as batched, \
            serve_process(run_dir, work / "serve-single.log", "--device", device, "--max-batch", "1") as single:
        bases = {"batched": batched, "single": single}
        for name, base in bases.items():  # warm-up: first batches, allocator growth
            asyncio.run(_load(base, data, max(levels), 2 * max(levels)))
        for clients in levels:
            total = max(requests, 2 * clients)
            # At least four requests per client a turn, so that a turn is mostly a steady stream, not its ramp.
            n = max(1, min(rounds, total // (4 * clients)))
            log(f"serve: {clients} concurrent client(s), {total} requests each way, in {n} turn(s) each ...")
            turns: dict[str, list] = {name: [] for name in bases}
            for turn in range(n):
                share = total // n + (turn < total % n)
                for name in (list(bases) if turn % 2 == 0 else list(bases)[::-1]):
                    # Untimed: a server that sat out the other's turn has handed its freed memory back
                    # (serve.IDLE_TRIM_S), and a server under steady load does not pay that again.
                    asyncio.run(_load(bases[name], data, clients, clients))
                    turns[name].append(asyncio.run(_load(bases[name], data, clients, share)))
            for name, parts in turns.items():
                seconds = sum(len(lat) / rate for rate, lat in parts)
                latencies = [x for _, lat in parts for x in lat]
                measured[name][clients] = (len(latencies) / seconds, latencies)
    return _serve_rows(measured, device, levels)


def _ms(latencies: list[float], q: float) -> float:
    return 1000 * float(np.quantile(latencies, q))


def _serve_rows(measured: dict, device: str, levels: Sequence[int]) -> list[Row]:
    rows = []
    where = "GPU" if device == "cuda" else "CPU"
    for clients in levels:
        (rate, lat), (base_rate, base_lat) = measured["batched"][clients], measured["single"][clients]
        held = clients == max(levels)
        rows.append(Row(f"serve, {clients} concurrent client(s), batched vs one at a time, {where}", rate, base_rate,
                        "requests/s", rate / base_rate, ">= 2x" if held else "-", rate / base_rate >= 2 if held else None,
                        f"p50 {_ms(lat, 0.5):.0f} ms, p95 {_ms(lat, 0.95):.0f} ms batched; p50 "
                        f"{_ms(base_lat, 0.5):.0f} ms, p95 {_ms(base_lat, 0.95):.0f} ms one at a time; "
                        f"{len(lat)} requests each, real uvicorn on loopback"))
    lone, base_lone = measured["batched"][min(levels)][1], measured["single"][min(levels)][1]
    p95, base_p95 = _ms(lone, 0.95), _ms(base_lone, 0.95)
    rows.append(Row(f"serve p95 latency, {min(levels)} client, batched vs one at a time, {where}", p95, base_p95, "ms",
                    p95 / base_p95, "<= 1.10", p95 / base_p95 <= 1.10,
                    "a lone request is never held back waiting for a batch"))
    return rows


def serving(array: np.ndarray, paths: list[str], args: argparse.Namespace, work: Path, device: str) -> list[Row]:
    """predict against model-only (both engines on a CPU, PyTorch on a GPU) and the server batched against one
    request per forward pass, on a run folder made for the bench (bench_run)."""
    from importlib.util import find_spec

    if args.no_serving:
        return []
    run_dir = bench_run(work / "bench-run", array, args.backbone, args.seed)
    files = [paths[i % len(paths)] for i in range(args.predict_images)]
    # onnxruntime runs the exported model on the CPU here: on a GPU machine only PyTorch is measured.
    engines = ["torch"] if device == "cuda" or find_spec("onnxruntime") is None else ["torch", "onnxruntime"]
    rows = []
    for engine in engines:
        log(f"predict: {len(files)} JPEG files through `predict`'s path vs the {engine} scorer alone, {device} ...")
        rows += predict_speed(run_dir, files, engine, device, args.predict_batch)
        log(f"measured: {rows[-2:]}")
    log(f"model alone: a batch of {max(SERVE_LEVELS)} against one image per forward pass, {device} ...")
    rows.append(batching_ceiling(run_dir, np.asarray(array[:max(SERVE_LEVELS)]), device))
    with open(paths[0], "rb") as image:
        rows += serve_speed(run_dir, image.read(), work, device, args.serve_requests)
    log(f"measured: {rows[-5:]}")
    return rows

