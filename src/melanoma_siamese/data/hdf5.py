"""Images stored as encoded bytes inside one HDF5 file (ISIC 2024's `train-image.hdf5`, one dataset per
`isic_id`), read in place: no image is unpacked to disk.

Such an image's path is `<file.hdf5>::<key>`, so the metadata table, the cache and its key treat it like
any file path; `MemberReader` turns it into the bytes to decode. h5py is optional (the `isic2024` extra).
"""
from __future__ import annotations

import io
import threading
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import DataError, Problem

SEPARATOR = "::"
SUFFIXES = (".hdf5", ".h5")


def member_path(file: Path, key: str) -> str:
    return f"{file}{SEPARATOR}{key}"


def split_member(path: str) -> tuple[str, Optional[str]]:
    """(file, key) of a `<file.hdf5>::<key>` path; (path, None) for a plain file."""
    file, sep, key = str(path).rpartition(SEPARATOR)
    if sep and Path(file).suffix.lower() in SUFFIXES:
        return file, key
    return str(path), None


def _h5py(file: Path):
    try:
        import h5py
    except ImportError:
        raise DataError([Problem(str(file), "reading images from an HDF5 file needs the h5py package; install "
                                 "it with: pip install 'melanoma-siamese[isic2024]'")]) from None
    return h5py


def list_members(file: Path) -> dict[str, str]:
    """key -> member path, for every dataset at the top of the file."""
    h5py = _h5py(file)
    try:
        with h5py.File(file, "r") as handle:
            return {key: member_path(file, key) for key in handle.keys()}
    except OSError as exc:
        raise DataError([Problem(str(file), f"cannot be read as HDF5 ({exc}); expected ISIC 2024's "
                                 "train-image.hdf5 (one dataset of JPEG bytes per isic_id)")]) from exc


class MemberReader:
    """Hands each path to the decoder: a plain path as it is, an HDF5 member as its bytes. Each HDF5 file is
    opened once; h5py serialises reads anyway, so one lock guards them and decoding stays parallel."""

    def __init__(self) -> None:
        self._files: dict[str, object] = {}
        self._lock = threading.Lock()

    def __call__(self, path: str) -> str | io.BytesIO:
        file, key = split_member(path)
        if key is None:
            return path
        with self._lock:
            if file not in self._files:
                self._files[file] = _h5py(Path(file)).File(file, "r")
            data = self._files[file][key][()]
        return io.BytesIO(bytes(data) if isinstance(data, bytes) else np.asarray(data).tobytes())

    def close(self) -> None:
        for handle in self._files.values():
            handle.close()
        self._files.clear()

    def __enter__(self) -> "MemberReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_source(path: str) -> str | bytes:
    """One image's path as PIL can open it: a plain path as it is, an HDF5 member as its bytes (for the few
    images read one at a time: a neighbour's thumbnail, export's sample images)."""
    file, key = split_member(path)
    if key is None:
        return path
    with MemberReader() as reader:
        return reader(path).getvalue()
