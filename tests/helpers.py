"""Helpers the tests import (`from helpers import ...`): recipe overrides and small datasets and images.

Fixtures stay in conftest.py; plain functions and constants live here, where an import can name them.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

HAM = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ham10000-sample"

# Small, fast settings shared by the end-to-end tests: ResNet-18 from scratch on 32 px images.
TINY = [
    "model.backbone=resnet18", "model.pretrained=none", "data.image_size=32", "siamese.epochs=2",
    "siamese.batch_size=16", "classifier.epochs=5", "evaluation.bootstrap=50", "runtime.num_workers=0",
    "runtime.progress=false", "data.balanced_test_per_class=10",
]


def set_args(items=TINY) -> list[str]:
    out = []
    for item in items:
        out += ["--set", item]
    return out


def write_image(path: Path, size=(32, 32), mode="RGB", color=(120, 80, 60)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fill = color if mode in ("RGB",) else (color + (255,) if mode == "RGBA" else color[0] if mode == "L" else None)
    if mode == "CMYK":
        fill = (10, 50, 80, 0)
    Image.new(mode, size, fill).save(path)
    return path


def kaggle_dataset(root: Path, n: int = 40, melanoma_every: int = 4) -> Path:
    """A small Kaggle-layout dataset with enough patients per class for the 70/10/20 split."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        image_id = f"ISIC_{i:07d}"
        target = int(i % melanoma_every == 0)
        arr = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
        (root / "train-image" / "image").mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(root / "train-image" / "image" / f"{image_id}.jpg")
        rows.append({"isic_id": image_id, "patient_id": f"IP_{i:04d}", "target": target})
    pd.DataFrame(rows).to_csv(root / "train-metadata.csv", index=False)
    return root


@contextmanager
def serve_process(run: Path, log_path: Path, *args: str, launcher: tuple[str, ...] = ("-m", "melanoma_siamese")):
    """`melanoma-siamese serve` on a free loopback port in its own process, once its health check answers:
    yields (the process, its base URL); ends it afterwards. `launcher`: what follows the Python binary."""
    import socket
    import subprocess
    import sys
    import time

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with open(log_path, "w") as log:
        server = subprocess.Popen([sys.executable, *launcher, "serve", "--run", str(run), "--port",
                                   str(port), "--quiet", *args], stdout=log, stderr=subprocess.STDOUT)
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.time() + 120
            while True:
                assert server.poll() is None, Path(log_path).read_text()
                try:
                    if httpx.get(base + "/api/health", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.time() < deadline, "server did not start in 120 s"
                time.sleep(0.5)
            yield server, base
        finally:
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait(timeout=10)
