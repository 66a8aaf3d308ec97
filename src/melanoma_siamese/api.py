"""The Python API: a trained run in a few calls, with the same numbers as the `predict` command.

    from melanoma_siamese.api import load_run

    model = load_run("runs/demo")        # a run folder, or a folder written by `export --format hf`
    model.predict(["lesion.jpg", pixels])  # one answer per image (paths, or H x W x 3 uint8 RGB arrays)
    model.embed(["lesion.jpg"])            # N x 512 embeddings, L2-normalised
    model.nearest(["lesion.jpg"], k=5)     # per image: the k most similar training images (id, label, distance)

A thin face on `inference` (LoadedRun, Predictor, describe): images are decoded and checked as `predict` does,
and an image that cannot be used raises ImageRejected naming it.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image

from .errors import ImageRejected
from .inference import DEFAULT_NEIGHBOURS, LoadedRun, PixelModel, Predictor, similar_cases
from .inference import load_run as load_run_folder
from .inputs import DEFAULT_MAX_PIXELS, read_image
from .runfolder import RunFolder

ImageLike = Union[str, Path, np.ndarray]


class Model:
    """A loaded run and one engine ("torch", or "onnxruntime" on RUN/models/model.onnx). `prevalence`: the share
    of melanoma in the population the probabilities are for (None: the run's default, as `predict`)."""

    def __init__(self, run: LoadedRun, engine: str = "torch", prevalence: Optional[float] = None,
                 batch_size: int = 64, max_pixels: int = DEFAULT_MAX_PIXELS):
        self.run = run
        self.predictor = Predictor(run, engine, batch_size=batch_size, prevalence=prevalence)
        self.max_pixels = max_pixels

    @property
    def threshold(self) -> float:
        """The decision threshold on the scale of the probabilities `predict` gives."""
        return self.predictor.threshold

    @property
    def prevalence(self) -> Optional[float]:
        return self.predictor.prevalence

    @property
    def module(self) -> torch.nn.Module:
        """Encoder + classifier as one torch module: uint8 N x S x S x 3 -> (embedding, raw melanoma score)."""
        d = self.run.config.data
        return PixelModel(self.run.encoder, self.run.classifier, d.mean, d.std).eval()

    def pixels(self, images: ImageLike | Sequence[ImageLike]) -> np.ndarray:
        """N x S x S x 3 uint8, decoded, resized and checked as `predict` does (S = the run's image size)."""
        items = _as_list(images)
        size, checks = self.run.config.data.image_size, self.run.checks
        out = []
        for i, item in enumerate(items):
            source = _png_bytes(item, i) if isinstance(item, np.ndarray) else Path(item)
            try:
                out.append(read_image(source, size, self.max_pixels, checks))
            except ImageRejected as exc:
                name = f"images[{i}] (array)" if isinstance(item, np.ndarray) else str(item)
                raise ImageRejected(f"{name}: {exc}", exc.status) from exc
        return np.stack(out) if out else np.zeros((0, size, size, 3), np.uint8)

    def predict(self, images: ImageLike | Sequence[ImageLike], neighbours: int = DEFAULT_NEIGHBOURS) -> list[dict]:
        """One answer per image, as `predict` and the web service give it: `probability` (calibrated, at
        `prevalence`), `decision`, `threshold` (same scale), `score` and `score_threshold` (raw), `unfamiliar`
        (`flag`, `distance`, `percentile`, `reason`), `knn_probability`, `knn_decision`, `similar`."""
        return self.predictor.answers(self.pixels(images), neighbours)

    def embed(self, images: ImageLike | Sequence[ImageLike]) -> np.ndarray:
        """N x D float32 embeddings, L2-normalised (cosine similarity = dot product)."""
        return self.predictor.score(self.pixels(images))[0]

    def nearest(self, images: ImageLike | Sequence[ImageLike], k: int = DEFAULT_NEIGHBOURS) -> list[list[dict]]:
        """Per image, the k most similar training images: `id`, `label` (1 = melanoma), `label_name`,
        `distance` (1 - cosine similarity), closest first."""
        return similar_cases(self.run, self.embed(images), k)


def load_run(run: str | Path, device: str = "cpu", engine: str = "torch", prevalence: Optional[float] = None) -> Model:
    """A run folder written by `train`, or a folder written by `export --format hf`, ready to answer."""
    from .runtime import resolve_device

    if is_shared_folder(Path(run)):
        from .hf import load_shared

        return Model(load_shared(Path(run), resolve_device(device)), engine, prevalence)
    return Model(load_run_folder(Path(run), device), engine, prevalence)


def is_shared_folder(path: Path) -> bool:
    """Whether `path` was written by `export --format hf` (weights in safetensors, no run checkpoints)."""
    return (path / "model.safetensors").is_file() and not RunFolder(path).siamese.is_file()


def _as_list(images: ImageLike | Sequence[ImageLike]) -> list[ImageLike]:
    """One image (a path, or one H x W x 3 array) as a list of one; a 4-D array as its images."""
    if isinstance(images, (str, Path)):
        return [images]
    if isinstance(images, np.ndarray):
        return list(images) if images.ndim == 4 else [images]
    return list(images)


def _png_bytes(array: np.ndarray, number: int) -> bytes:
    """An array as lossless PNG bytes, so arrays and files go through the same decoding and checks."""
    if array.dtype != np.uint8 or array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise ImageRejected(f"images[{number}]: expected an H x W x 3 uint8 RGB array, got shape "
                            f"{tuple(array.shape)} and dtype {array.dtype}", 422)
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buffer, format="PNG")
    return buffer.getvalue()
