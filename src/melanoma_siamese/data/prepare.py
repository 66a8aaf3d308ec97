"""From a folder to validated, decoded, split data: everything checked before a model is built."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Protocol

import numpy as np
import pandas as pd

from ..config import DataConfig
from .clinical import CLINICAL_COLUMNS
from .images import build_cache
from .metadata import DataError, Dataset, Problem, read_dataset
from .split import balanced_subsample, patient_split, split_problems, subsample_train_melanoma


@dataclass
class Prepared:
    table: pd.DataFrame  # kept images: isic_id, patient_id, target, path, row (cache row), part, ...
    array: np.ndarray  # the decoded cache, indexed by table["row"]
    dataset: Dataset
    skipped: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=["isic_id", "reason"]))
    conversions: dict = field(default_factory=dict)

    def rows(self, part: str) -> np.ndarray:
        return np.array(self.table.loc[self.table["part"] == part, "row"], dtype=np.int64)

    def labels(self, part: str) -> np.ndarray:
        return np.array(self.table.loc[self.table["part"] == part, "target"], dtype=np.int64)

    def part(self, part: str) -> pd.DataFrame:
        return self.table[self.table["part"] == part]


class DataLocation(Protocol):
    """Where the data is: a layout folder (`data`), or a metadata CSV with its image folder."""

    data: Optional[Path]
    metadata: Optional[Path]
    images: Optional[Path]


def load_and_validate(source: DataLocation, config: DataConfig, workers: int, progress: bool,
                      log=print) -> Prepared:
    """Read metadata, decode every image, and report every problem at once (DataError) unless skippable."""
    dataset = read_dataset(source.data, source.metadata, source.images, config.image_types)
    log(f"Labels: {dataset.labels_rule}")
    for warning in dataset.warnings:
        log(f"Warning: {warning}")
    if dataset.dropped_image_types:
        log(f"Left out (data.image_types={config.image_types}): " + ", ".join(
            f"{n} '{kind}'" for kind, n in sorted(dataset.dropped_image_types.items())))
    image_size, skip_bad_images = config.image_size, config.skip_bad_images
    cache_dir = Path(config.cache_dir) if config.cache_dir else None
    table = dataset.table
    cache = build_cache(table["path"].tolist(), image_size, cache_dir, workers=workers, progress=progress)
    problems = list(dataset.problems)
    skipped = []
    for row, reason in sorted(cache.failures.items()):
        image_id, path = table.at[row, "isic_id"], table.at[row, "path"]
        if reason == "file absent":
            skipped.append((image_id, f"listed in {dataset.metadata_file.name} but absent from {dataset.image_dir}"))
            continue  # already reported by read_dataset
        skipped.append((image_id, reason))
        problems.append(Problem(path, f"{reason}; expected a JPEG or PNG image", "isic_id", image_id, kind="decode"))
    image_problems = [p for p in problems if p.kind in ("missing", "decode")]
    other_problems = [p for p in problems if p.kind not in ("missing", "decode")]
    keep = np.ones(len(table), dtype=bool)
    keep[list(cache.failures)] = False
    keep &= (table["target"] >= 0).to_numpy()
    if not skip_bad_images and image_problems:
        hint = Problem("command line", f"{len(image_problems)} image(s) are missing or do not decode; "
                       "pass --skip-bad-images to drop them (their ids are then written to the run folder)")
        other_problems.append(hint)
    fatal = other_problems + ([] if skip_bad_images else image_problems)
    table = table.assign(row=np.arange(len(table)))[keep].reset_index(drop=True)
    skipped_frame = pd.DataFrame(skipped, columns=["isic_id", "reason"])
    if fatal:
        ordered = [p for p in fatal if p.file != "command line"] + [p for p in fatal if p.file == "command line"]
        raise DataError(ordered)
    if cache.conversions:
        log("Converted while decoding: " + ", ".join(f"{k}: {v}" for k, v in sorted(cache.conversions.items())))
    if dataset.dropped_duplicates:
        log(f"Dropped {dataset.dropped_duplicates} duplicate image(s) listed in ISIC_2020_Training_Duplicates.csv")
    return Prepared(table, cache.array, dataset, skipped_frame, cache.conversions)


def assign_split(prepared: Prepared, val_fraction: float, test_fraction: float, seed: int,
                 train_melanoma_fraction: Optional[float]) -> None:
    problems = split_problems(prepared.table, val_fraction, test_fraction, str(prepared.dataset.metadata_file))
    if problems:
        raise DataError(problems)
    part = patient_split(prepared.table, val_fraction, test_fraction, seed)
    if train_melanoma_fraction is not None:
        part = subsample_train_melanoma(prepared.table, part, train_melanoma_fraction, seed)
    prepared.table["part"] = part.values


def apply_saved_split(prepared: Prepared, split_file: Path) -> None:
    """Reuse a run's split.csv; every id in it must still be in the data."""
    split = pd.read_csv(split_file, dtype={"isic_id": str})
    parts = dict(zip(split["isic_id"], split["part"]))
    missing = sorted(set(parts) - set(prepared.table["isic_id"]))
    if missing:
        raise DataError([Problem(str(split_file), f"{len(missing)} image(s) of the saved split are no longer in the "
                                 f"data, e.g. {', '.join(missing[:5])}; evaluate needs the data the run was "
                                 "trained on", "isic_id", missing[0])])
    prepared.table["part"] = prepared.table["isic_id"].map(parts).fillna("unused").values


def write_split(prepared: Prepared, path: Path) -> None:
    # The clinical columns make the run folder alone tell each image's age, sex, site and skin type.
    columns = ["isic_id", "patient_id", "target", "part", *CLINICAL_COLUMNS]
    prepared.table[columns].to_csv(path, index=False)


def balanced_test_ids(prepared: Prepared, per_class: int, seed: int) -> np.ndarray:
    test = prepared.part("test")
    idx = balanced_subsample(test["target"].to_numpy(), per_class, seed)
    return test["isic_id"].to_numpy()[idx]
