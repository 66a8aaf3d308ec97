"""Is this image like the ones the model was trained on? Two answers, both before trusting a score.

1. From the embedding: the mean cosine distance (1 - cos) of an image to its k nearest training images,
   placed among the same distance for every validation image (a percentile). Above a cut, the validation
   distances' quantile q, the image is *unfamiliar*: the model has seen nothing like it, whatever it scores.
   The mean of k (default 5) rather than the single nearest: one odd or duplicated training image cannot
   make an unfamiliar query look familiar, and it is the distance of the five similar lesions a page shows.
   Validation images share no patient with the training part, so their distances are those of new images
   the model does handle; with q = 0.99 about 1% of such images are flagged.
2. From the image's appearance, the same way: `appearance_features` (a histogram of fine texture) in
   place of the embedding. An encoder trained to separate two classes can map a photo unlike its training
   images right next to them (a run trained on generated cartoons puts real photos within its validation
   images' distances); their texture still differs. Measured (experiments/trust_measure.py): the cartoon
   run's embedding flags 3% of real photos, the appearance 99%; flag an image when either says unfamiliar.
3. From the pixels of the decoded original (before any resize): too small to be a dermoscopic photograph,
   or near-constant (a blank, a flat colour) so there is nothing to score.

Imports no torch: it works on embeddings from either engine (PyTorch or ONNX).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import numpy as np

from .errors import ConfigError

ROUNDING = 1e-6  # cosine distances closer than this are the same distance computed in another batch
METHOD = "mean cosine distance (1 - cos) to the k nearest training images"
# Query rows per matrix product: 1024 x 33k training images of float32 is 135 MB at most.
_CHUNK = 1024
# Grey levels are measured on at most about this many pixels per side (a strided sample: cheap on 60 MP).
_STD_SAMPLE_SIDE = 512


def _normalised(embeddings: np.ndarray) -> np.ndarray:
    e = np.atleast_2d(np.asarray(embeddings, dtype=np.float32))
    return e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)


def knn_distance(query: np.ndarray, reference: np.ndarray, k: int) -> np.ndarray:
    """Mean cosine distance of each query row to its k nearest reference rows (both L2-normalised)."""
    query, reference = _normalised(query), _normalised(reference)
    k = min(k, len(reference))
    out = []
    for start in range(0, len(query), _CHUNK):
        dist = 1.0 - query[start:start + _CHUNK] @ reference.T
        nearest = np.partition(dist, k - 1, axis=1)[:, :k] if k < dist.shape[1] else dist
        # Rounding makes an image's distance to itself about -1e-7.
        out.append(np.clip(nearest, 0.0, 2.0).mean(axis=1))
    return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)


@dataclass(frozen=True, eq=False)
class Familiarity:
    """The training embeddings, the validation distances (sorted) and the cut chosen on them."""

    train: np.ndarray
    val_distances: np.ndarray
    k: int
    quantile: float
    cut: float

    def distance(self, embeddings: np.ndarray) -> np.ndarray:
        return knn_distance(embeddings, self.train, self.k)

    def assess(self, embeddings: np.ndarray) -> dict:
        """Per image: `distance`, `percentile` (share of validation images at or below it, in %) and
        `unfamiliar` (distance above the cut), as arrays of the query's length."""
        distance = self.distance(embeddings)
        # Within float rounding counts as equal: a validation image scored in a batch of 8 lands 1e-7 from
        # its own recorded distance, which must not move its percentile a step or flip it over the cut.
        at_or_below = np.searchsorted(self.val_distances, distance + ROUNDING, side="right")
        return {"distance": distance, "percentile": 100.0 * at_or_below / len(self.val_distances),
                "unfamiliar": distance > self.cut + ROUNDING}

    def record(self) -> dict:
        """How the cut was chosen, as plain JSON values, for the run folder."""
        return {"method": METHOD, "k": self.k, "quantile": self.quantile, "n_train": int(len(self.train)),
                "n_val": int(len(self.val_distances)), "cut": float(self.cut),
                "val_median": float(np.median(self.val_distances))}


def fit(train_embeddings: np.ndarray, val_embeddings: np.ndarray, k: int = 5,
        quantile: float = 0.99) -> Familiarity:
    """The cut = the `quantile` of the validation images' distances to the training images."""
    if k < 1:
        raise ConfigError(f"unfamiliar-image k must be at least 1, got {k}")
    if not 0 < quantile < 1:
        raise ConfigError(f"unfamiliar-image quantile must be strictly between 0 and 1, got {quantile}")
    if len(train_embeddings) == 0 or len(val_embeddings) == 0:
        raise ConfigError("unfamiliar-image detection needs training and validation embeddings")
    train = _normalised(train_embeddings)
    val_distances = np.sort(knn_distance(val_embeddings, train, k))
    return Familiarity(train, val_distances, int(k), float(quantile), float(np.quantile(val_distances, quantile)))


def from_index(embeddings: np.ndarray, parts: np.ndarray, k: int = 5, quantile: float = 0.99) -> Familiarity:
    """From a run's retrieval index (index.npz: embeddings and parts "train"/"val")."""
    parts = np.asarray(parts).astype(str)
    return fit(embeddings[parts == "train"], embeddings[parts == "val"], k, quantile)


# |Laplacian| of the grey image (0-1 grey levels, so 0 to 4), binned on a roughly logarithmic scale.
_TEXTURE_BINS = np.array([0, 0.001, 0.002, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 4.0001])


def appearance_features(pixels: np.ndarray, chunk: int = 256) -> np.ndarray:
    """N x 9 descriptors of N x S x S x 3 uint8 images at the model's input size: the share of pixels in
    9 bins of |Laplacian| of the grey image (the finest texture: sharpness, grain, noise), square-rooted
    so the cosine of two descriptors is the Bhattacharyya coefficient of their histograms.

    Texture, not colour: skin colour varies among real photos as much as between photos and cartoons,
    and a colour histogram (tried, 4 x 4 x 4 cells) flagged 20% of generated images where this flags 99%."""
    pixels = np.asarray(pixels)
    parts = [_texture(pixels[start:start + chunk]) for start in range(0, len(pixels), chunk)]
    return np.concatenate(parts) if parts else np.zeros((0, len(_TEXTURE_BINS) - 1), dtype=np.float32)


def _texture(pixels: np.ndarray) -> np.ndarray:
    # The mean of the three channels as two adds (the same floats as .mean(axis=3)): a reduction over an axis
    # of 3 took 3 ms an image, a quarter of predict's time per image on a GPU.
    grey = (pixels[..., 0].astype(np.float32) + pixels[..., 1] + pixels[..., 2]) / 3 / 255
    # The Laplacian in place, in the order of 4c - up - down - left - right (the same floats as one expression).
    laplacian = 4 * grey[:, 1:-1, 1:-1]
    for neighbour in (grey[:, :-2, 1:-1], grey[:, 2:, 1:-1], grey[:, 1:-1, :-2], grey[:, 1:-1, 2:]):
        laplacian -= neighbour
    laplacian = np.abs(laplacian, out=laplacian).reshape(len(pixels), -1)
    # np.histogram's counts (bins [a, b), every value below the last edge) from counts at or above each edge:
    # with uneven edges np.histogram sorts every image's values, which took 1 ms an image, nine tenths of
    # describing an answer.
    at_or_above = np.stack([np.count_nonzero(laplacian >= edge, axis=1) for edge in _TEXTURE_BINS[:-1]], axis=1)
    counts = at_or_above - np.pad(at_or_above[:, 1:], ((0, 0), (0, 1)))
    return np.sqrt(counts / max(laplacian.shape[1], 1)).astype(np.float32)


def _grey_sample(image) -> np.ndarray:
    """Grey levels (0-255, ITU-R 601 luma as PIL's "L") of a strided sample of the image's pixels."""
    if not isinstance(image, np.ndarray):  # a PIL image: reduce a huge one before converting it whole
        factor = max(1, min(image.size) // _STD_SAMPLE_SIDE)
        image = np.asarray((image.reduce(factor) if factor > 1 else image).convert("L"))
    step = max(1, min(image.shape[:2]) // _STD_SAMPLE_SIDE)
    pixels = image[::step, ::step].astype(np.float64)
    if pixels.ndim == 3 and pixels.shape[2] >= 3:
        return pixels[..., :3] @ np.array([0.299, 0.587, 0.114])
    return pixels[..., 0] if pixels.ndim == 3 else pixels


def image_problems(image: Union["PIL.Image.Image", np.ndarray], min_side: int = 32,  # noqa: F821
                   min_std: float = 2.0) -> list[str]:
    """Why the decoded original image (PIL image, or H x W [x C] uint8 array) is no photo to score; [] if none.

    min_side: the shorter side in pixels (real dermoscopic photos are hundreds of pixels; the demo's
    generated images are 64). min_std: the grey-level standard deviation (0-255); the lowest of the 2,000
    real HAM10000 sample images is 7.3, a flat colour is 0 (about 1 after JPEG compression).
    """
    height, width = image.shape[:2] if isinstance(image, np.ndarray) else image.size[::-1]
    problems = []
    if min(width, height) < min_side:
        problems.append(f"the image is {width}x{height} pixels; a dermoscopic photo needs at least "
                        f"{min_side} pixels on its shorter side")
    else:
        spread = float(_grey_sample(image).std())
        if spread < min_std:
            problems.append(f"the image is nearly one flat colour (grey-level standard deviation {spread:.1f}, "
                            f"below {min_std:g}); there is no lesion to score")
    return problems
