"""Find a dataset's layout, read its metadata, and derive the melanoma label.

Every accepted layout ends as one table with the columns `isic_id`, `path`, `patient_id`, `target`
(1 = melanoma, 0 = not), plus whatever other columns the metadata had. Problems are collected, not
raised one by one, so a user sees all of them at once.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from ..errors import DataError, Problem  # noqa: F401  (re-exported)
from ..inputs import IMAGE_EXTENSIONS

ID_COLUMNS = ("isic_id", "image_name", "image_id", "id")
DIAGNOSIS_COLUMNS = ("diagnosis_3", "diagnosis", "dx")
ALL_DIAGNOSIS_COLUMNS = ("diagnosis_1", "diagnosis_2", "diagnosis_3", "diagnosis_4", "diagnosis_5", "diagnosis", "dx")
# Diagnosis codes that mean melanoma where a column holds codes rather than words (HAM10000's `dx`).
MELANOMA_CODES = ("mel",)
BENIGN_MALIGNANT = {
    "malignant": 1,
    "benign": 0,
    "indeterminate": 0,
    "indeterminate/benign": 0,
    "indeterminate/malignant": 0,
}


@dataclass
class Dataset:
    """The metadata table plus what was learnt reading it."""

    table: pd.DataFrame
    layout: str
    metadata_file: Path
    image_dir: Path
    problems: list[Problem] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    dropped_duplicates: int = 0


def detect_layout(data_dir: Path) -> tuple[str, Path, Path, Optional[Path]]:
    """Return (layout name, metadata CSV, image folder, duplicates CSV or None)."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError([Problem(str(data_dir), "is not a folder; expected a dataset folder (see README: layouts)")])
    kaggle = data_dir / "train-metadata.csv"
    if kaggle.is_file():
        return "kaggle-256", kaggle, data_dir / "train-image" / "image", None
    duplicates = data_dir / "ISIC_2020_Training_Duplicates.csv"
    duplicates = duplicates if duplicates.is_file() else None
    for name in ("ISIC_2020_Training_GroundTruth_v2.csv", "ISIC_2020_Training_GroundTruth.csv"):
        if (data_dir / name).is_file():
            images = data_dir / "ISIC_2020_Training_JPEG"
            if (images / "train").is_dir():
                images = images / "train"
            return "isic-2020-site", data_dir / name, images, duplicates
    if (data_dir / "train.csv").is_file():
        # The competition's train/ holds DICOM files; the JPEGs are under jpeg/train/.
        return "isic-2020-kaggle", data_dir / "train.csv", data_dir / "jpeg" / "train", duplicates
    if (data_dir / "metadata.csv").is_file():
        return "isic-cli", data_dir / "metadata.csv", data_dir, None
    found = sorted(p.name for p in data_dir.iterdir())[:12]
    raise DataError([
        Problem(
            str(data_dir),
            "no known layout found; expected one of train-metadata.csv + train-image/image/ (Kaggle 256x256), "
            "train.csv + jpeg/train/ or ISIC_2020_Training_GroundTruth*.csv + ISIC_2020_Training_JPEG/ "
            "(original ISIC 2020), metadata.csv + <isic_id>.jpg (isic-cli), or pass --metadata CSV --images DIR; "
            f"found: {', '.join(found) or 'nothing'}",
        )
    ])


def _text(value) -> str:
    return "" if value is None or (isinstance(value, float) and np.isnan(value)) else str(value).strip()


def derive_labels(table: pd.DataFrame, file: str) -> tuple[pd.Series, list[Problem], list[str]]:
    """The melanoma label from `target`, else `benign_malignant`, else the diagnosis columns."""
    problems: list[Problem] = []
    warnings: list[str] = []
    labels = pd.Series(np.full(len(table), -1, dtype=np.int64), index=table.index)
    ids = table["isic_id"].astype(str)
    if "target" in table.columns:
        for i, value in table["target"].items():
            text = _text(value)
            try:
                number = float(text)
            except ValueError:
                number = None
            if number in (0.0, 1.0):
                labels[i] = int(number)
            else:
                problems.append(Problem(file, f"image {ids[i]}: target must be 0 (not melanoma) or 1 (melanoma)",
                                        "target", text or "<empty>"))
        return labels, problems, warnings
    if "benign_malignant" in table.columns:
        for i, value in table["benign_malignant"].items():
            text = _text(value).lower()
            if text in BENIGN_MALIGNANT:
                labels[i] = BENIGN_MALIGNANT[text]
            else:
                problems.append(Problem(file, f"image {ids[i]}: benign_malignant must be one of "
                                        f"{', '.join(BENIGN_MALIGNANT)}", "benign_malignant", text or "<empty>"))
        warnings.append(f"{file}: no 'target' column; labels from column 'benign_malignant': malignant -> "
                        f"melanoma (1), benign -> 0 ({int((labels == 1).sum())} of {len(labels)} melanoma)")
        if "diagnosis" in table.columns:
            diagnosis = table["diagnosis"].map(_text).str.lower()
            other = (labels == 1) & ~diagnosis.str.contains("melanoma") & (diagnosis != "") & (diagnosis != "unknown")
            if other.any():
                kinds = ", ".join(sorted(set(diagnosis[other])))
                warnings.append(
                    f"{file}: {int(other.sum())} image(s) are 'malignant' with a diagnosis that is not melanoma "
                    f"({kinds}); they are labelled 1 (melanoma) as in ISIC 2020's target. Add a 'target' column "
                    "to label them otherwise."
                )
        return labels, problems, warnings
    present = [c for c in ALL_DIAGNOSIS_COLUMNS if c in table.columns]
    if not present:
        problems.append(Problem(file, "no label column; expected 'target' (0/1), 'benign_malignant', or the "
                                "diagnosis columns isic-cli writes (diagnosis_1..diagnosis_3 or diagnosis), or "
                                "HAM10000's dx; "
                                f"columns found: {', '.join(map(str, table.columns))}", "target"))
        return labels, problems, warnings
    return _labels_from_diagnosis(table, file, present, labels)


def _labels_from_diagnosis(table: pd.DataFrame, file: str, present: list[str],
                           labels: pd.Series) -> tuple[pd.Series, list[Problem], list[str]]:
    """Melanoma = a diagnosis text naming melanoma, or the code 'mel' (HAM10000's dx); anything else 0."""
    problems: list[Problem] = []
    ids = table["isic_id"].astype(str)
    for i in table.index:
        texts = {c: _text(table.at[i, c]) for c in present}
        if not any(texts.values()):
            problems.append(Problem(file, f"image {ids[i]}: no diagnosis in any of {', '.join(present)}; "
                                    "expected a diagnosis text (melanoma = 1, anything else = 0)",
                                    present[0], "<empty>"))
            continue
        melanoma = any("melanoma" in texts.get(c, "").lower() or texts.get(c, "").lower() in MELANOMA_CODES
                       for c in DIAGNOSIS_COLUMNS)
        labels[i] = int(melanoma)
    used = [c for c in DIAGNOSIS_COLUMNS if c in table.columns]
    warning = (f"{file}: no 'target' or 'benign_malignant' column; labels from column(s) "
               f"{', '.join(used) or ', '.join(present)}: a diagnosis containing 'melanoma', or the code 'mel', -> "
               f"melanoma (1), any other -> 0 ({int((labels == 1).sum())} of {len(labels)} melanoma)")
    return labels, problems, [warning]


def _find_image(image_dir: Path, image_id: str, listing: dict[str, Path]) -> Optional[Path]:
    if Path(image_id).suffix.lower() in IMAGE_EXTENSIONS:
        return listing.get(image_id)
    for ext in IMAGE_EXTENSIONS:
        hit = listing.get(image_id + ext) or listing.get(image_id + ext.upper())
        if hit is not None:
            return hit
    return None


def read_dataset(
    data_dir: Optional[Path] = None,
    metadata: Optional[Path] = None,
    images: Optional[Path] = None,
) -> Dataset:
    """Read metadata and locate images. Problems are returned on the Dataset, not raised."""
    layout, metadata_file, image_dir, duplicates_file = _locate(data_dir, metadata, images)
    file = str(metadata_file)
    table, problems = _read_ids(metadata_file)
    dropped = 0
    if duplicates_file is not None:
        table, dropped, duplicate_problems = _drop_listed_duplicates(table, duplicates_file)
        problems += duplicate_problems
    labels, label_problems, warnings = derive_labels(table, file)
    problems += label_problems
    table["target"] = labels.values
    warnings += _patient_groups(table, file)
    problems += _attach_paths(table, image_dir, layout, metadata_file)
    front = ["isic_id", "patient_id", "target", "path"]
    table = table[front + [c for c in table.columns if c not in front]]
    return Dataset(table, layout, metadata_file, image_dir, problems, warnings, dropped)


def _locate(data_dir: Optional[Path], metadata: Optional[Path],
            images: Optional[Path]) -> tuple[str, Path, Path, Optional[Path]]:
    """(layout, metadata file, image folder, duplicates file) from --data or --metadata with --images."""
    if metadata is None and images is None:
        return detect_layout(Path(data_dir))
    if metadata is None or images is None:
        raise DataError([Problem("command line", "--metadata and --images go together")])
    if not Path(metadata).is_file():
        raise DataError([Problem(str(metadata), "metadata CSV does not exist")])
    return "custom", Path(metadata), Path(images), None


def _read_ids(metadata_file: Path) -> tuple[pd.DataFrame, list[Problem]]:
    """The metadata table with its id column named isic_id; empty and repeated ids as problems."""
    file = str(metadata_file)
    try:
        table = pd.read_csv(metadata_file, dtype={"isic_id": str, "image_name": str, "patient_id": str},
                            low_memory=False)
    except Exception as exc:  # pandas raises many kinds here
        raise DataError([Problem(file, f"cannot be read as CSV: {exc}")]) from exc
    id_column = next((c for c in ID_COLUMNS if c in table.columns), None)
    if id_column is None:
        raise DataError([Problem(file, f"missing the image id column; expected one of {', '.join(ID_COLUMNS)}; "
                                 f"columns found: {', '.join(map(str, table.columns))}", ID_COLUMNS[0])])
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


def _drop_listed_duplicates(table: pd.DataFrame, duplicates_file: Path) -> tuple[pd.DataFrame, int, list[Problem]]:
    """ISIC 2020 lists near-identical image pairs; the second of each pair is dropped."""
    pairs = pd.read_csv(duplicates_file, dtype=str)
    if len(pairs.columns) < 2:
        return table, 0, [Problem(str(duplicates_file), "expected two columns (image_name_1, image_name_2)")]
    drop = set(pairs[pairs.columns[1]].map(_text)) - {""}
    keep = ~table["isic_id"].isin(drop)
    return table[keep].reset_index(drop=True), int((~keep).sum()), []


def _patient_groups(table: pd.DataFrame, file: str) -> list[str]:
    """Fill patient_id in place; an image without one becomes its own group. Returns the warnings."""
    warnings = []
    if "patient_id" not in table.columns and "lesion_id" in table.columns:
        # HAM10000 and ISIC 2019 give no patient but several images of one lesion: those must share a part.
        warnings.append(f"{file}: no 'patient_id' column; images are grouped by 'lesion_id' instead, so several "
                        "images of one lesion never straddle parts (images of one patient still may)")
        table["patient_id"] = table["lesion_id"].map(_text).map(lambda v: f"lesion:{v}" if v else "")
    if "patient_id" not in table.columns:
        warnings.append(f"{file}: no 'patient_id' column; every image is its own patient group, so images of one "
                        "patient may land in different parts of the split")
        table["patient_id"] = ""
    patients = table["patient_id"].map(_text)
    missing = patients == ""
    if missing.any() and "patient_id" in table.columns and not missing.all():
        warnings.append(f"{file}: {int(missing.sum())} image(s) have no patient_id; each becomes its own group")
    table["patient_id"] = np.where(missing, "single:" + table["isic_id"], patients)
    return warnings


def _attach_paths(table: pd.DataFrame, image_dir: Path, layout: str, metadata_file: Path) -> list[Problem]:
    """Set table["path"] in place ("" where absent). Returns the problems: no folder, or listed images absent."""
    listing: dict[str, Path] = {}
    problems = []
    if image_dir.is_dir():
        listing = {p.name: p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS}
    else:
        problems.append(Problem(str(image_dir), f"image folder does not exist; expected the {layout} layout's "
                                "images there"))
    paths = []
    for image_id in table["isic_id"]:
        path = _find_image(image_dir, image_id, listing) if image_id else None
        if path is None and image_dir.is_dir() and image_id:
            problems.append(Problem(str(image_dir), f"image listed in {metadata_file.name} is absent; expected "
                                    f"{image_id}.jpg", "isic_id", image_id, kind="missing"))
        paths.append(str(path) if path is not None else "")
    table["path"] = paths
    return problems
