"""`export`: one ONNX model of encoder + classifier, checked against PyTorch.

The ONNX model takes what a decoder gives: `images`, uint8, N x S x S x 3 (RGB, channels last, S the run's
image_size), and returns `embedding` (N x 512, L2-normalised) and `probability` (N, melanoma). Scaling and
normalisation are inside it (inference.PixelModel), so a caller needs no knowledge of the run's mean and std.
Torch is imported when the command runs, not when its options are declared.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import numpy as np

TOLERANCE = 1e-4
OPSET = 17


def export_onnx(run, path: Path, opset: int = OPSET) -> Path:
    """Write the run's encoder + classifier (a LoadedRun) as one ONNX file."""
    from .inference import PixelModel

    model = PixelModel(run.encoder.cpu(), run.classifier.cpu(), run.config.data.mean, run.config.data.std).eval()
    export_pixel_model(model, run.config.data.image_size, path, opset)
    run.encoder.to(run.device)
    return path


def export_pixel_model(model, size: int, path: Path, opset: int = OPSET) -> Path:
    """Write one ONNX file of a PixelModel (uint8 N x size x size x 3 in; embedding and probability out),
    checked by onnx."""
    import onnx
    import torch

    example = torch.zeros(2, size, size, 3, dtype=torch.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        # The TorchScript exporter warns that it is deprecated; it needs no onnxscript and handles these models.
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), str(path), dynamo=False, opset_version=opset,
                          input_names=["images"], output_names=["embedding", "probability"],
                          dynamic_axes={"images": {0: "batch"}, "embedding": {0: "batch"}, "probability": {0: "batch"}})
    onnx.checker.check_model(str(path))
    return path


def sample_pixels(run, count: int = 8, seed: int = 0) -> tuple[np.ndarray, str]:
    """Training images of the run where its data can still be read, else seeded random images."""
    from .errors import ImageRejected
    from .inputs import read_image

    size = run.config.data.image_size
    images = []
    for image_id in run.index.part("train").ids:
        if len(images) == count:
            break
        path = run.image_paths.get(str(image_id))
        if path:
            try:
                images.append(read_image(path, size))
            except ImageRejected:
                continue
    if images:
        return np.stack(images), f"{len(images)} training images"
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (count, size, size, 3), dtype=np.uint8), f"{count} random images (data not found)"


def compare_with_torch(run, onnx_path: Path, pixels: np.ndarray) -> dict:
    """Largest absolute differences between onnxruntime and the PyTorch engine `predict` uses."""
    from .inference import Predictor

    torch_emb, torch_prob = Predictor(run, "torch").score(pixels)
    onnx_emb, onnx_prob = Predictor(run, "onnxruntime", onnx_path).score(pixels)
    return {"probability": float(np.abs(torch_prob - onnx_prob).max()),
            "embedding": float(np.abs(torch_emb - onnx_emb).max())}


def cmd_export(args: argparse.Namespace) -> int:
    from .inference import load_run

    run = load_run(args.run, "cpu")
    path = args.out or run.folder.onnx
    export_onnx(run, path, args.opset)
    pixels, what = sample_pixels(run, args.check_images)
    diff = compare_with_torch(run, path, pixels)
    largest = max(diff.values())
    print(f"Wrote {path} (input `images`: uint8 N x {run.config.data.image_size} x {run.config.data.image_size} x 3 "
          f"RGB; outputs `embedding`, `probability`)")
    print(f"Checked against PyTorch on {what}: largest absolute difference {largest:.3g} "
          f"(probability {diff['probability']:.3g}, embedding {diff['embedding']:.3g}; limit {TOLERANCE:g})")
    if largest >= TOLERANCE:
        print(f"error: the ONNX model differs from PyTorch by more than {TOLERANCE:g}", file=sys.stderr)
        return 1
    return 0


def add_parser(sub) -> None:
    parser = sub.add_parser("export", help="write encoder + classifier as one ONNX model and check it")
    parser.add_argument("--run", type=Path, required=True, help="run folder written by train")
    parser.add_argument("--format", choices=("onnx",), default="onnx")
    parser.add_argument("--out", type=Path, help="output file (default RUN/models/model.onnx)")
    parser.add_argument("--opset", type=int, default=OPSET)
    parser.add_argument("--check-images", type=int, default=8, help="images compared with PyTorch (default 8)")
    parser.set_defaults(handler=cmd_export)
