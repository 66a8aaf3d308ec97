"""The tiny trained run the inference tests share (predict, export, serve), and small image-making helpers.

Trained once per pytest session into the session's base temporary folder; later callers find it on disk.
A test that writes into a run (export, evaluate) works on its own copy (`private_copy`), never on this one.
"""
from __future__ import annotations

import shutil
import struct
import zlib
from pathlib import Path

from melanoma_siamese.cli import main
from melanoma_siamese.runfolder import RunFolder

from helpers import TINY, set_args

FAST = [*TINY, "siamese.epochs=1", "classifier.epochs=3", "evaluation.bootstrap=0"]


def shared_run(tiny_data: Path, tmp_path_factory) -> Path:
    run = tmp_path_factory.getbasetemp() / "inference-run"
    if not RunFolder(run).index.is_file():
        assert main(["train", "--data", str(tiny_data), "--out", str(run), "--seed", "0", *set_args(FAST)]) == 0
    return run


def private_copy(run: Path, where: Path) -> Path:
    """A copy of a shared run that a test may change."""
    return Path(shutil.copytree(run, where / run.name))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height: a decompression bomb's first bytes, without the bomb."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def image_files(tiny_data: Path) -> list[Path]:
    return sorted((tiny_data / "train-image" / "image").glob("*.jpg"))
