"""Read a dataset's metadata and derive the melanoma label, whatever layout it came in (layouts.py).

Every accepted layout ends as one table with the columns `isic_id`, `path`, `patient_id`, `target`
(1 = melanoma, 0 = not), the clinical columns `age, sex, site, skin_type` (clinical.py), plus whatever
other columns the metadata had. Problems are collected, not raised one by one, so a user sees all of
them at once.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from ..errors import DataError, Problem  # noqa: F401  (re-exported)
from ..inputs import IMAGE_EXTENSIONS
from .clinical import CLINICAL_COLUMNS, clinical_columns
from .hdf5 import SUFFIXES as HDF5_SUFFIXES
from .hdf5 import list_members
from .labels import derive_labels  # noqa: F401  (re-exported)
from .layouts import Found, detect_layout  # noqa: F401  (re-exported)

# `image` is the one-hot ground truth's id column (ISIC 2018 Task 3, ISIC 2019).
ID_COLUMNS = ("isic_id", "image_name", "image_id", "image", "id")
# isic-cli's `image_type`: which kinds of photograph `data.image_types` may name.
DERMOSCOPIC = "dermoscopic"


@dataclass
class Dataset:
    """The metadata table plus what was learnt reading it."""

    table: pd.DataFrame
    layout: str
    metadata_file: Path
    image_dir: Path  # the first image folder (or HDF5 file), for messages
    problems: list[Problem] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    dropped_duplicates: int = 0
    # The table's own column each clinical column came from (None: the data has none).
    clinical_sources: dict = field(default_factory=dict)
    labels_rule: str = ""  # "labels from column X: ... -> melanoma (k of n)"; printed and saved in run.json
    dropped_image_types: dict = field(default_factory=dict)  # image_type -> images left out (isic-cli)


def _text(value) -> str:
    return "" if value is None or (isinstance(value, float) and np.isnan(value)) else str(value).strip()


def _plain_name(name: str) -> str:
    """A file name (or HDF5 key) without its image extension and without ISIC 2019's `_downsampled` suffix
    (its CSV and its file names disagree on the suffix both ways)."""
    stem, ext = os.path.splitext(name)
    stem = stem if ext.lower() in IMAGE_EXTENSIONS else name
    return stem[:-len("_downsampled")] if stem.endswith("_downsampled") else stem


def _image_finder(listing: dict[str, str]):
    """image id -> path or None: the exact name, else the name with an image extension or a `_downsampled`
    suffix more or less. An id that has an image extension must match exactly."""
    by_plain: dict[str, str] = {}
    for name in sorted(listing):
        by_plain.setdefault(_plain_name(name), listing[name])

    def find(image_id: str) -> Optional[str]:
        exact = listing.get(image_id) or listing.get(image_id + ".jpg")
        if exact is not None or os.path.splitext(image_id)[1].lower() in IMAGE_EXTENSIONS:
            return exact
        return by_plain.get(_plain_name(image_id))

    return find


def read_dataset(
    data_dir: Optional[Path] = None,
    metadata: Optional[Path] = None,
    images: Optional[Path] = None,
    image_types: str = DERMOSCOPIC,
) -> Dataset:
    """Read metadata and locate images. Problems are returned on the Dataset, not raised.

    `image_types` (isic-cli layout only): comma-separated kinds of `image_type` to keep ("dermoscopic",
    "clinical", "tbp", ...; each matches the start of the value) or "all"."""
    found = _locate(data_dir, metadata, images)
    file = str(found.metadata_file)
    table, problems = _read_ids(found.metadata_file)
    for joined in found.joined:
        table = _join(table, joined)
    dropped = 0
    if found.duplicates is not None:
        table, dropped, duplicate_problems = _drop_listed_duplicates(table, found.duplicates)
        problems += duplicate_problems
    kinds: dict = {}
    warnings: list[str] = []
    if found.filters_image_type:
        table, kinds, warnings = _keep_image_types(table, image_types, file)
    labels = found.labels(table, file)
    problems += labels.problems
    warnings += labels.warnings
    table["target"] = labels.values.values
    warnings += _patient_groups(table, file)
    clinical = clinical_columns(table, file)
    table[list(CLINICAL_COLUMNS)] = clinical.table
    warnings += clinical.warnings
    problems += _attach_paths(table, found)
    front = ["isic_id", "patient_id", "target", "path", *CLINICAL_COLUMNS]
    table = table[front + [c for c in table.columns if c not in front]]
    return Dataset(table, found.layout, found.metadata_file, found.images[0], problems, warnings, dropped,
                   clinical.sources, f"{file}: {labels.rule}", kinds)


def _locate(data_dir: Optional[Path], metadata: Optional[Path], images: Optional[Path]) -> Found:
    """Where everything is, from --data (a recognised layout) or --metadata with --images."""
    if metadata is None and images is None:
        return detect_layout(Path(data_dir))
    if metadata is None or images is None:
        raise DataError([Problem("command line", "--metadata and --images go together")])
    if not Path(metadata).is_file():
        raise DataError([Problem(str(metadata), "metadata CSV does not exist")])
    return Found("custom", Path(metadata), (Path(images),))


def _separator(file: Path) -> str:
    # Harvard Dataverse serves HAM10000's metadata tab-separated (HAM10000_metadata.tab).
    with open(file, encoding="utf-8", errors="replace") as handle:
        first = handle.readline()
    return "\t" if "\t" in first and "," not in first else ","


def _read_csv(file: Path) -> pd.DataFrame:
    try:
        return pd.read_csv(file, sep=_separator(file), dtype={c: str for c in ID_COLUMNS + ("patient_id", "lesion_id")},
                           low_memory=False)
    except Exception as exc:  # pandas raises many kinds here
        raise DataError([Problem(str(file), f"cannot be read as CSV: {exc}")]) from exc


def _id_column(table: pd.DataFrame, file: Path) -> str:
    column = next((c for c in ID_COLUMNS if c in table.columns), None)
    if column is None:
        raise DataError([Problem(str(file), f"missing the image id column; expected one of {', '.join(ID_COLUMNS)}; "
                                 f"columns found: {', '.join(map(str, table.columns))}", ID_COLUMNS[0])])
    return column


def _read_ids(metadata_file: Path) -> tuple[pd.DataFrame, list[Problem]]:
    """The metadata table with its id column named isic_id; empty and repeated ids as problems."""
    file = str(metadata_file)
    table = _read_csv(metadata_file)
    id_column = _id_column(table, metadata_file)
    table = table.rename(columns={id_column: "isic_id"}) if id_column != "isic_id" else table
    table["isic_id"] = table["isic_id"].map(_text)
    table = table.reset_index(drop=True)
    problems = [Problem(file, f"row {i + 2}: empty image id", "isic_id", "<empty>")
                for i in table.index[table["isic_id"] == ""]]
    dup_mask = table["isic_id"].duplicated(keep=False) & (table["isic_id"] != "")
    for image_id in sorted(set(table.loc[dup_mask, "isic_id"])):
        rows = [str(i + 2) for i in table.index[table["isic_id"] == image_id]]
        problems.append(Problem(file, f"duplicate image id on rows {', '.join(rows)}; each id must appear once",
                                id_column, image_id))
    return table, problems


def _join(table: pd.DataFrame, file: Path) -> pd.DataFrame:
    """Add the columns of a CSV keyed by image id (ISIC 2019 metadata, ISIC 2018 lesion groupings) that the
    table lacks; an image the CSV does not list gets them empty."""
    other = _read_csv(file)
    other = other.rename(columns={_id_column(other, file): "isic_id"})
    other["isic_id"] = other["isic_id"].map(_text)
    other = other.drop_duplicates("isic_id")[["isic_id"] + [c for c in other.columns if c not in table.columns]]
    return table.merge(other, on="isic_id", how="left")


def _keep_image_types(table: pd.DataFrame, image_types: str, file: str) -> tuple[pd.DataFrame, dict, list[str]]:
    """Keep the kinds of photograph asked for (isic-cli's `image_type`); the count of each kind dropped, and a
    warning for each kind asked for that no image has (a misspelt one would otherwise drop them all)."""
    if "image_type" not in table.columns or image_types.strip().lower() == "all":
        return table, {}, []
    wanted = tuple(k.strip().lower() for k in image_types.split(",") if k.strip())
    kinds = table["image_type"].map(_text)
    found = ", ".join(f"'{k}' ({n})" for k, n in kinds.value_counts().items())
    warnings = [f"{file}: data.image_types names '{w}', which starts no image_type here; found: {found}"
                for w in wanted if not kinds.str.lower().str.startswith(w).any()]
    # An image without an image_type is kept: nothing says it is not dermoscopic.
    keep = kinds.str.lower().str.startswith(wanted) | (kinds == "")
    dropped = kinds[~keep].value_counts().to_dict()
    return table[keep].reset_index(drop=True), {str(k): int(v) for k, v in dropped.items()}, warnings


def _drop_listed_duplicates(table: pd.DataFrame, duplicates_file: Path) -> tuple[pd.DataFrame, int, list[Problem]]:
    """ISIC 2020 lists near-identical image pairs; the second of each pair is dropped."""
    pairs = pd.read_csv(duplicates_file, dtype=str)
    if len(pairs.columns) < 2:
        return table, 0, [Problem(str(duplicates_file), "expected two columns (image_name_1, image_name_2)")]
    drop = set(pairs[pairs.columns[1]].map(_text)) - {""}
    keep = ~table["isic_id"].isin(drop)
    return table[keep].reset_index(drop=True), int((~keep).sum()), []


def _patient_groups(table: pd.DataFrame, file: str) -> list[str]:
    """Fill patient_id in place: the patient, else the lesion (several images of one lesion must share a part),
    else the image alone. Returns the warnings."""
    warnings = []
    has_patient, has_lesion = "patient_id" in table.columns, "lesion_id" in table.columns
    patients = table["patient_id"].map(_text) if has_patient else pd.Series("", index=table.index)
    lesions = table["lesion_id"].map(_text) if has_lesion else pd.Series("", index=table.index)
    if not has_patient and has_lesion:
        warnings.append(f"{file}: no 'patient_id' column; images are grouped by 'lesion_id' instead, so several "
                        "images of one lesion never straddle parts (images of one patient still may)")
    if not has_patient and not has_lesion:
        warnings.append(f"{file}: no 'patient_id' or 'lesion_id' column; every image is its own group, so images "
                        "of one patient or lesion may land in different parts of the split")
    by_lesion = (patients == "") & (lesions != "")
    alone = (patients == "") & (lesions == "")
    if has_patient and by_lesion.any():
        warnings.append(f"{file}: {int(by_lesion.sum())} image(s) have no patient_id; grouped by their lesion_id")
    if (has_patient or has_lesion) and alone.any():
        column = "patient_id" if has_patient else "lesion_id"
        warnings.append(f"{file}: {int(alone.sum())} image(s) have no {column}; each becomes its own group")
    table["patient_id"] = np.where(by_lesion, "lesion:" + lesions,
                                   np.where(alone, "single:" + table["isic_id"], patients))
    return warnings


def _listing(source: Path) -> dict[str, str]:
    """File name (or HDF5 key) -> path of every image in a folder or HDF5 file."""
    if source.suffix.lower() in HDF5_SUFFIXES:
        return list_members(source)
    return {p.name: str(p) for p in source.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS}


def _attach_paths(table: pd.DataFrame, found: Found) -> list[Problem]:
    """Set table["path"] in place ("" where absent). Returns the problems: no folder, or listed images absent."""
    listing: dict[str, str] = {}
    problems = []
    for source in found.images:
        if source.exists():
            listing.update(_listing(source))
        else:
            problems.append(Problem(str(source), f"image folder does not exist; expected the {found.layout} "
                                    "layout's images there"))
    folders_found = not problems
    find = _image_finder(listing)
    paths = []
    for image_id in table["isic_id"]:
        path = find(image_id) if image_id else None
        if path is None and folders_found and image_id:
            where = " or ".join(p.name for p in found.images)
            expected = f"a dataset named {image_id}" if found.images[0].is_file() else f"{image_id}.jpg"
            problems.append(Problem(str(found.images[0]), f"image listed in {found.metadata_file.name} is absent "
                                    f"from {where}; expected {expected}", "isic_id", image_id, kind="missing"))
        paths.append(path or "")
    table["path"] = paths
    return problems
