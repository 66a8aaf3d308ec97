"""The dataset layouts `--data DIR` recognises, each as its official download lays it out.

`LAYOUTS` is the table: a name, what it looks for (in words, for the message when nothing matches),
and a function that recognises the folder and says where everything is (`Found`). Reading the files
found is the same for all (metadata.read_dataset); only the label rule differs for ISIC 2024.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import pandas as pd

from ..errors import DataError, Problem
from .labels import Labels, derive_labels, isic2024_labels

LabelRule = Callable[[pd.DataFrame, str], Labels]


@dataclass(frozen=True)
class Found:
    """Where a recognised layout's files are."""

    layout: str
    metadata_file: Path
    images: tuple[Path, ...]  # image folders, or one HDF5 file holding the images' bytes
    duplicates: Optional[Path] = None  # ISIC 2020's list of near-identical pairs
    joined: tuple[Path, ...] = ()  # CSVs joined on the image id: ISIC 2019 metadata, ISIC 2018 lesion groupings
    labels: LabelRule = derive_labels
    filters_image_type: bool = False  # isic-cli downloads mix dermoscopic and clinical photographs


@dataclass(frozen=True)
class Layout:
    name: str
    expects: str
    find: Callable[[Path], Optional[Found]]


def _inner(folder: Path) -> Path:
    """Some unpackers nest a folder in one of the same name (ISIC_2019_Training_Input/ISIC_2019_Training_Input)."""
    nested = folder / folder.name
    return nested if nested.is_dir() else folder


def _file(root: Path, name: str) -> Optional[Path]:
    """`name` in root, or inside a folder of the same stem (ISIC 2018 zips unpack the CSV into one)."""
    for path in (root / name, root / Path(name).stem / name):
        if path.is_file():
            return path
    return None


def _isic2024(root: Path) -> Optional[Found]:
    if (root / "train-metadata.csv").is_file() and (root / "train-image.hdf5").is_file():
        return Found("isic-2024", root / "train-metadata.csv", (root / "train-image.hdf5",), labels=isic2024_labels)
    return None


def _kaggle_256(root: Path) -> Optional[Found]:
    if (root / "train-metadata.csv").is_file():
        return Found("kaggle-256", root / "train-metadata.csv", (root / "train-image" / "image",))
    return None


def _duplicates(root: Path) -> Optional[Path]:
    path = root / "ISIC_2020_Training_Duplicates.csv"
    return path if path.is_file() else None


def _isic2020_site(root: Path) -> Optional[Found]:
    for name in ("ISIC_2020_Training_GroundTruth_v2.csv", "ISIC_2020_Training_GroundTruth.csv"):
        if (root / name).is_file():
            images = root / "ISIC_2020_Training_JPEG"
            images = images / "train" if (images / "train").is_dir() else images
            return Found("isic-2020-site", root / name, (images,), _duplicates(root))
    return None


def _isic2020_kaggle(root: Path) -> Optional[Found]:
    # The competition's train/ holds DICOM files; the JPEGs are under jpeg/train/.
    if (root / "train.csv").is_file():
        return Found("isic-2020-kaggle", root / "train.csv", (root / "jpeg" / "train",), _duplicates(root))
    return None


def _ham10000(root: Path) -> Optional[Found]:
    names = ("HAM10000_metadata.csv", "HAM10000_metadata", "HAM10000_metadata.tab")
    metadata = next((root / name for name in names if (root / name).is_file()), None)
    if metadata is None:
        return None
    # Kaggle's copy holds each part twice, also in lower case; the same names then point to the same images.
    parts = [_inner(root / f"{prefix}_images_part_{n}") for n in (1, 2) for prefix in ("HAM10000", "ham10000")]
    return Found("ham10000", metadata, tuple(p for p in parts if p.is_dir()) or (root / "HAM10000_images_part_1",))


def _isic2018(root: Path) -> Optional[Found]:
    for part in ("Training", "Validation", "Test"):
        truth = _file(root, f"ISIC2018_Task3_{part}_GroundTruth.csv")
        if truth is not None:
            groupings = _file(root, f"ISIC2018_Task3_{part}_LesionGroupings.csv")
            return Found("isic-2018-task3", truth, (_inner(root / f"ISIC2018_Task3_{part}_Input"),),
                         joined=(groupings,) if groupings else ())
    return None


def _isic2019(root: Path) -> Optional[Found]:
    truth = root / "ISIC_2019_Training_GroundTruth.csv"
    if not truth.is_file():
        return None
    metadata = root / "ISIC_2019_Training_Metadata.csv"
    return Found("isic-2019", truth, (_inner(root / "ISIC_2019_Training_Input"),),
                 joined=(metadata,) if metadata.is_file() else ())


def _isic_cli(root: Path) -> Optional[Found]:
    if (root / "metadata.csv").is_file():
        return Found("isic-cli", root / "metadata.csv", (root,), filters_image_type=True)
    return None


# Most specific first: ISIC 2024 and the Kaggle 256x256 copy share train-metadata.csv, and metadata.csv
# (isic-cli) is the most generic name.
LAYOUTS = (
    Layout("isic-2024", "train-metadata.csv + train-image.hdf5 (ISIC 2024, Kaggle)", _isic2024),
    Layout("kaggle-256", "train-metadata.csv + train-image/image/ (Kaggle ISIC 2020 256x256)", _kaggle_256),
    Layout("isic-2020-site", "ISIC_2020_Training_GroundTruth*.csv + ISIC_2020_Training_JPEG/ (ISIC 2020, "
           "challenge site)", _isic2020_site),
    Layout("isic-2020-kaggle", "train.csv + jpeg/train/ (SIIM-ISIC 2020 competition)", _isic2020_kaggle),
    Layout("ham10000", "HAM10000_metadata(.csv, .tab) + HAM10000_images_part_1/ and _part_2/ (HAM10000 as published)",
           _ham10000),
    Layout("isic-2018-task3", "ISIC2018_Task3_{Training,Validation,Test}_GroundTruth.csv + "
           "ISIC2018_Task3_..._Input/ (ISIC 2018 Task 3)", _isic2018),
    Layout("isic-2019", "ISIC_2019_Training_GroundTruth.csv + ISIC_2019_Training_Input/ (ISIC 2019)", _isic2019),
    Layout("isic-cli", "metadata.csv + <isic_id>.jpg (isic-cli image download)", _isic_cli),
)


def detect_layout(data_dir: Path) -> Found:
    """The first layout of `LAYOUTS` the folder matches; a DataError listing what was looked for otherwise."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError([Problem(str(data_dir), "is not a folder; expected a dataset folder (see README: layouts)")])
    for layout in LAYOUTS:
        found = layout.find(data_dir)
        if found is not None:
            return found
    seen = sorted(p.name for p in data_dir.iterdir())[:12]
    expected = "; ".join(layout.expects for layout in LAYOUTS)
    raise DataError([Problem(str(data_dir), f"no known layout found; looked for: {expected}; or pass --metadata CSV "
                             f"--images DIR; found: {', '.join(seen) or 'nothing'}")])
