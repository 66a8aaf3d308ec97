"""What the stage-2 classifier reads beside the image's embedding: clinical metadata and patient context.

`classifier.features` names the sets: `image` (always), `clinical` (age, sex, site from data/clinical.py's
one vocabulary, each with an explicit missing code, so data without some or all of them is scored by the
same model) and `patient` (how much an image stands out among the same patient's other images in the
scored set). Nothing here is fitted: the same images give the same features in training and scoring.
No torch.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import pandas as pd

from .data.clinical import SEXES, SITES

FEATURE_SETS = ("image", "clinical", "patient")
# Age is scaled to about 0-1 (years / 100); its missing code is age 0 with the indicator set.
CLINICAL_NAMES = ("age / 100", "age missing", *(f"sex {s}" for s in SEXES), "sex missing",
                  *(f"site {s}" for s in SITES), "site missing")
# The blocks of CLINICAL_NAMES that one clinical variable fills, for blanking a variable as a whole.
CLINICAL_BLOCKS = {"age": slice(0, 2), "sex": slice(2, 2 + len(SEXES) + 1),
                   "site": slice(3 + len(SEXES), 3 + len(SEXES) + len(SITES) + 1)}
PATIENT_NAMES = ("distance to the patient's other images", "rank within the patient (0 = stands out most)",
                 "log of the patient's image count", "no other image of the patient")


def check_features(features: Sequence[str]) -> Optional[str]:
    """What is wrong with a `classifier.features` value, or None."""
    unknown = [f for f in features if f not in FEATURE_SETS]
    if unknown:
        return f"unknown feature set(s) {', '.join(map(repr, unknown))}; use some of {', '.join(FEATURE_SETS)}"
    if "image" not in features:
        return "must include image (the classifier always reads the embedding)"
    if len(set(features)) != len(features):
        return "names a feature set twice"
    return None


def extra_names(features: Sequence[str]) -> list[str]:
    """Names of the columns the classifier reads after the embedding, in order."""
    return [*(CLINICAL_NAMES if "clinical" in features else ()), *(PATIENT_NAMES if "patient" in features else ())]


def clinical_features(table: pd.DataFrame) -> np.ndarray:
    """N x len(CLINICAL_NAMES): age/100 with a missing indicator, sex and site one-hot plus missing.
    A column the table lacks is missing throughout."""
    n = len(table)
    age = pd.to_numeric(table["age"], errors="coerce").to_numpy(dtype=float) if "age" in table else np.full(n, np.nan)
    known = np.isfinite(age)
    out = [np.where(known, age / 100.0, 0.0), (~known).astype(float)]
    for column, vocabulary in (("sex", SEXES), ("site", SITES)):
        values = table[column].fillna("").astype(str).to_numpy() if column in table else np.full(n, "")
        onehot = np.stack([values == v for v in vocabulary], axis=1).astype(float)
        out += [*onehot.T, (onehot.sum(1) == 0).astype(float)]
    return np.stack(out, axis=1).astype(np.float32)


def patient_features(embeddings: np.ndarray, patients: Sequence) -> np.ndarray:
    """N x len(PATIENT_NAMES), from the images scored together: each image's cosine distance to the mean of its
    patient's other images (leave one out), its rank among them by that distance, the patient's image count,
    and whether it is alone (then distance and rank are 0)."""
    e = np.asarray(embeddings, dtype=np.float64)
    out = np.zeros((len(e), len(PATIENT_NAMES)), dtype=np.float32)
    out[:, 3] = 1.0
    _, inverse, counts = np.unique(np.asarray(patients).astype(str), return_inverse=True, return_counts=True)
    for group in np.flatnonzero(counts >= 2):
        members = np.flatnonzero(inverse == group)
        others = (e[members].sum(0, keepdims=True) - e[members]) / (len(members) - 1)
        others /= np.maximum(np.linalg.norm(others, axis=1, keepdims=True), 1e-12)
        distance = 1.0 - (e[members] * others).sum(1)
        # Ties share the higher place (a patient's two images stand out from each other equally).
        rank = (distance[None, :] > distance[:, None] + 1e-9).sum(1) / (len(members) - 1)
        out[members] = np.stack([distance, rank, np.full(len(members), np.log(len(members))),
                                 np.zeros(len(members))], axis=1)
    return out


def extra_features(features: Sequence[str], embeddings: np.ndarray, table: pd.DataFrame) -> np.ndarray:
    """The columns after the embedding (extra_names), for `table`'s rows in order (N x 0 for image only).
    Patient features need a `patient_id` column; without it every image is alone."""
    blocks = [np.zeros((len(embeddings), 0), dtype=np.float32)]
    if "clinical" in features:
        blocks.append(clinical_features(table))
    if "patient" in features:
        patients = table["patient_id"].to_numpy() if "patient_id" in table else np.arange(len(table))
        blocks.append(patient_features(embeddings, patients))
    return np.concatenate(blocks, axis=1)


def blank_clinical(extra: np.ndarray, features: Sequence[str], rate: float, rng: np.random.Generator) -> np.ndarray:
    """A copy of `extra` with clinical variables set to their missing code at random: each variable alone with
    probability `rate`, and all of them together with probability `rate`. Trained so, the missing code means
    "unknown" and data without metadata is scored as the image alone would be."""
    if "clinical" not in features or rate <= 0:
        return extra
    out = extra.copy()
    whole = rng.random(len(out)) < rate
    for block in CLINICAL_BLOCKS.values():
        drop = whole | (rng.random(len(out)) < rate)
        out[drop, block] = 0.0
        out[drop, block.stop - 1] = 1.0  # the block's last column is its missing indicator
    return out


def model_input(features: Sequence[str], embeddings: np.ndarray, table: pd.DataFrame) -> np.ndarray:
    """What the classifier reads: the embedding, then the extra features."""
    return np.concatenate([np.asarray(embeddings, dtype=np.float32), extra_features(features, embeddings, table)],
                          axis=1)
