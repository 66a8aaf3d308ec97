"""`export`: one ONNX model of encoder + classifier, checked against PyTorch; or (`--format hf`) a folder to share
on the Hugging Face Hub (hf.py).

The ONNX model takes what a decoder gives: `images`, uint8, N x S x S x 3 (RGB, channels last, S the run's
image_size), and returns `embedding` (N x 512, L2-normalised) and `score` (N: the classifier's raw melanoma
score, class-weighted and uncalibrated; not the probability `predict` shows). Scaling and normalisation are
inside it (inference.PixelModel), so a caller needs no knowledge of the run's mean and std. The file's metadata
holds what turns a score into an answer: the decision threshold on the score, and the calibration that gives
the probability at a prevalence.
Writing it needs only `onnx`; the check runs it with onnxruntime or onnxruntime-gpu, whichever is installed.
Torch is imported when the command runs, not when its options are declared.
"""
from __future__ import annotations

import argparse
import copy
import inspect
import sys
import warnings
from pathlib import Path

import numpy as np

from .errors import ConfigError

TOLERANCE = 1e-4
OPSET = 17


def export_onnx(run, path: Path, opset: int = OPSET) -> Path:
    """Write the run's encoder + classifier (a LoadedRun) as one ONNX file; `export` adds score_metadata."""
    from .inference import PixelModel
    from .timm_backbone import fixed_input_size

    encoder = copy.deepcopy(run.encoder).cpu()
    fixed_input_size(encoder, run.config.data.image_size)
    model = PixelModel(encoder, copy.deepcopy(run.classifier).cpu(), run.config.data.mean, run.config.data.std).eval()
    return export_pixel_model(model, run.config.data.image_size, path, opset)


def score_metadata(run) -> dict[str, str]:
    """What a caller of the ONNX file needs to read its `score`: the threshold on it and the calibration, as
    at the time of export (strings: ONNX metadata holds text)."""
    import json

    from . import __version__

    meta = {"score": "the classifier's raw melanoma score (class-weighted training, uncalibrated): not a "
                     "probability; melanoma where score >= score_threshold",
            # repr: the exact float, as the threshold is a validation image's own score and decides ties.
            "score_threshold": repr(float(run.thresholds.classifier)), "threshold_source": run.thresholds.source,
            "image_size": str(run.config.data.image_size), "melanoma_siamese_version": __version__}
    cal = run.calibration
    if cal is not None:
        meta["calibration"] = json.dumps(cal.to_dict())
        shown, source = run.prevalence()
        meta["probability"] = (f"sigmoid(slope * logit(score) + intercept + logit(P) - logit({cal.prevalence:.6g})) "
                               "with the calibration's slope and intercept: the probability of melanoma at a "
                               "prevalence P; the threshold moves with it (the same formula on score_threshold)")
        if shown is not None:
            meta["prevalence"] = repr(float(shown))  # what predict shows without --prevalence
            meta["prevalence_source"] = source
    return meta


def describe_model(path: Path, metadata: dict[str, str]) -> Path:
    """Write `metadata` into the ONNX file's metadata_props (read back with onnxruntime:
    session.get_modelmeta().custom_metadata_map)."""
    import onnx

    model = onnx.load(str(path))
    onnx.helper.set_model_props(model, metadata)
    onnx.save(model, str(path))
    return path


def export_pixel_model(model, size: int, path: Path, opset: int = OPSET) -> Path:
    """Write one ONNX file of a PixelModel (uint8 N x size x size x 3 in; embedding and raw score out),
    checked by onnx."""
    import onnx
    import torch

    example = torch.zeros(2, size, size, 3, dtype=torch.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The TorchScript exporter needs no onnxscript and handles these models; `dynamo` (torch 2.5+) must say so.
    choice = {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}
    with warnings.catch_warnings():
        # It warns that it is deprecated.
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(model, (example,), str(path), **choice, opset_version=opset,
                              input_names=["images"], output_names=["embedding", "score"],
                              dynamic_axes={"images": {0: "batch"}, "embedding": {0: "batch"}, "score": {0: "batch"}})
        except torch.onnx.errors.OnnxExporterError as exc:
            backbone = getattr(getattr(model, "encoder", None), "args", {}).get("backbone", "this backbone")
            raise ConfigError(f"ONNX export of {backbone} failed at opset {opset}: {exc}. Try another --opset, or "
                              "score the run with the torch engine (predict's default)") from exc
    onnx.checker.check_model(str(path))
    return path


def sample_pixels(run, count: int = 8, seed: int = 0) -> tuple[np.ndarray, str]:
    """Training images of the run where its data can still be read, else seeded random images."""
    from .data.hdf5 import read_source
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
                images.append(read_image(read_source(path), size))
            except (ImageRejected, KeyError, OSError):  # gone or unreadable since training: the next one
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
    return {"score": float(np.abs(torch_prob - onnx_prob).max()),
            "embedding": float(np.abs(torch_emb - onnx_emb).max())}


def cmd_export(args: argparse.Namespace) -> int:
    from .inference import load_run

    run = load_run(args.run, "cpu")
    pixels, what = sample_pixels(run, args.check_images)
    if args.format == "hf":
        return _export_hf(run, args.out or run.path / "hf", pixels, what)
    return _export_onnx(run, args.out or run.folder.onnx, args.opset, pixels, what)


def _export_onnx(run, path: Path, opset: int, pixels: np.ndarray, what: str) -> int:
    from importlib.util import find_spec

    if find_spec("onnx") is None:
        raise ConfigError("export --format onnx needs the onnx package: pip install 'melanoma-siamese[export]'")
    describe_model(export_onnx(run, path, opset), score_metadata(run))
    size = run.config.data.image_size
    print(f"Wrote {path} (input `images`: uint8 N x {size} x {size} x 3 RGB; outputs `embedding` and `score`)")
    print(_score_sentence(run))
    if find_spec("onnxruntime") is None:
        print("warning: not checked against PyTorch: neither onnxruntime nor onnxruntime-gpu is installed "
              "(pip install onnxruntime, then export again to check)", file=sys.stderr)
        return 0
    return _report(compare_with_torch(run, path, pixels), f"PyTorch on {what}", "ONNX model", TOLERANCE)


def _score_sentence(run) -> str:
    sentence = (f"`score` is the classifier's raw score, not a probability: melanoma where score >= "
                f"{run.thresholds.classifier:.4f} ({run.thresholds.source})")
    if run.calibration is None or run.calibration.method == "none":
        return sentence + "; the run has no calibration, so predict shows this score too"
    return (sentence + "; predict shows the calibrated probability instead. The file's metadata (`score_threshold`, "
            "`calibration`, `probability`) says how to get it")


def _export_hf(run, out: Path, pixels: np.ndarray, what: str) -> int:
    from importlib.util import find_spec

    if find_spec("huggingface_hub") is None or find_spec("safetensors") is None:
        raise ConfigError("export --format hf needs huggingface_hub and safetensors: "
                          "pip install 'melanoma-siamese[hub]'")
    from .hf import TOLERANCE as HF_TOLERANCE
    from .hf import compare_with_run, describe_folder, export_hf

    export_hf(run, out)
    print(f"Wrote {describe_folder(out)}")
    print(f"Load it with melanoma_siamese.api.load_run('{out}') or MelanomaSiamese.from_pretrained('{out}'); "
          f"share it with: huggingface-cli upload USER/NAME {out}")
    return _report(compare_with_run(run, out, pixels), f"the run on {what}", "folder loaded with from_pretrained",
                   HF_TOLERANCE)


def _report(diff: dict, against: str, what: str, limit: float) -> int:
    largest = max(diff.values())
    print(f"Checked against {against}: largest absolute difference {largest:.3g} "
          f"(score {diff['score']:.3g}, embedding {diff['embedding']:.3g}; limit {limit:g})")
    if largest >= limit:
        print(f"error: the {what} differs by more than {limit:g}", file=sys.stderr)
        return 1
    return 0


def add_parser(sub) -> None:
    parser = sub.add_parser("export", help="write encoder + classifier as one ONNX model (or a folder to share: "
                                           "--format hf) and check it")
    parser.add_argument("--run", type=Path, required=True, help="run folder written by train")
    parser.add_argument("--format", choices=("onnx", "hf"), default="onnx",
                        help="onnx: one ONNX file; hf: a folder huggingface_hub's from_pretrained loads")
    parser.add_argument("--out", type=Path, help="output file (default RUN/models/model.onnx) or, for hf, "
                                                 "folder (default RUN/hf)")
    parser.add_argument("--opset", type=int, default=OPSET)
    parser.add_argument("--check-images", type=int, default=8, help="images compared with PyTorch (default 8)")
    parser.set_defaults(handler=cmd_export)
