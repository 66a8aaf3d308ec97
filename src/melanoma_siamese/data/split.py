"""Patient-grouped, label-stratified train/val/test split, and the seeded subsamples drawn from it."""
from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from .metadata import Problem


def split_problems(table: pd.DataFrame, val_fraction: float, test_fraction: float, file: str) -> list[Problem]:
    """Too few patients of a class for every part to hold it."""
    needed = max(round(1 / val_fraction), round(1 / test_fraction))
    problems = []
    for label, name in ((1, "melanoma"), (0, "not melanoma")):
        rows = table[table["target"] == label]
        patients = rows["patient_id"].nunique()
        if patients < needed:
            problems.append(Problem(
                file, f"only {len(rows)} image(s) from {patients} patient(s) are {name} (target {label}); the "
                f"{1 - val_fraction - test_fraction:.0%}/{val_fraction:.0%}/{test_fraction:.0%} split needs at "
                f"least {needed} patients of each class", "target", str(label)))
    return problems


def fold_problems(train: pd.DataFrame, k: int, file: str) -> list[Problem]:
    """data.folds=k needs at least k patients of each class in the training part (each fold holds both)."""
    patients = train["patient_id"].astype(str)
    problems = []
    for label, name in ((1, "melanoma"), (0, "benign")):
        count = patients[train["target"] == label].nunique()
        if count < k:
            problems.append(Problem(file, f"data.folds={k}: the training part has {count} patient(s) with {name} "
                                    "images; each fold needs at least one (use fewer folds)", "target", str(label)))
    return problems


def _take_fold(labels: np.ndarray, groups: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    splitter = StratifiedGroupKFold(n_splits=max(2, round(1 / fraction)), shuffle=True, random_state=seed)
    _, held = next(splitter.split(np.zeros(len(labels)), labels, groups))
    return held


def patient_split(table: pd.DataFrame, val_fraction: float, test_fraction: float, seed: int) -> pd.Series:
    """'train' / 'val' / 'test' per row; no patient in two parts; class ratio kept in each part."""
    labels = table["target"].to_numpy()
    groups = table["patient_id"].to_numpy()
    part = np.full(len(table), "train", dtype=object)
    test = _take_fold(labels, groups, test_fraction, seed)
    part[test] = "test"
    rest = np.flatnonzero(part == "train")
    val = _take_fold(labels[rest], groups[rest], val_fraction / (1 - test_fraction), seed + 1)
    part[rest[val]] = "val"
    return pd.Series(part, index=table.index, name="part")


def subsample_train_melanoma(table: pd.DataFrame, part: pd.Series, fraction: float, seed: int) -> pd.Series:
    """Mark melanoma rows of the training part 'train_unused' until melanoma is `fraction` of it."""
    part = part.copy()
    train = part == "train"
    positives = np.flatnonzero(train & (table["target"] == 1))
    negatives = int((train & (table["target"] == 0)).sum())
    keep = int(round(fraction * negatives / (1 - fraction))) if fraction < 1 else len(positives)
    keep = max(1, min(keep, len(positives)))
    rng = np.random.default_rng(seed)
    drop = rng.permutation(positives)[keep:]
    part.iloc[drop] = "train_unused"
    return part


def balanced_subsample(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """Indices of a class-balanced subsample: the same images for the same seed."""
    rng = np.random.default_rng(seed)
    n = min(per_class, int((labels == 0).sum()), int((labels == 1).sum()))
    chosen = [rng.choice(np.flatnonzero(labels == c), size=n, replace=False) for c in (0, 1)]
    return np.sort(np.concatenate(chosen))
