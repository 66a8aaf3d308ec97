"""The run folder: every path of a run, in one place.

Every module that reads or writes a run goes through `RunFolder`; no other module spells a file name
of the run. Imports no torch, so light commands can check a folder quickly.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError


@dataclass(frozen=True)
class RunFolder:
    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    # What `train` writes first: the resolved configuration and the run's description.
    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def run_json(self) -> Path:
        return self.root / "run.json"

    @property
    def split(self) -> Path:
        return self.root / "split.csv"

    @property
    def skipped_images(self) -> Path:
        return self.root / "skipped_images.csv"

    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def siamese(self) -> Path:
        return self.models / "siamese.pth"

    @property
    def classifier(self) -> Path:
        return self.models / "classifier.pth"

    @property
    def onnx(self) -> Path:
        return self.models / "model.onnx"

    def state(self, stage: str = "siamese") -> Path:
        return self.root / "state" / f"{stage}_last.pth"

    def history(self, stage: str) -> Path:
        return self.root / f"history_{stage}.jsonl"

    @property
    def index(self) -> Path:
        return self.root / "index.npz"

    @property
    def thresholds(self) -> Path:
        return self.root / "threshold.json"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.json"

    @property
    def predictions(self) -> Path:
        return self.root / "predictions.csv"

    @property
    def baseline(self) -> Path:
        return self.root / "baseline.json"

    @property
    def images(self) -> Path:
        return self.root / "images"

    def image(self, name: str) -> Path:
        return self.images / name

    def external(self, name: str) -> "RunFolder":
        """Where `evaluate --data OTHER` writes: a run-shaped folder of its own under external/."""
        return RunFolder(self.root / "external" / name)

    def make(self) -> "RunFolder":
        self.models.mkdir(parents=True, exist_ok=True)
        self.images.mkdir(parents=True, exist_ok=True)
        return self

    def require_trained(self) -> "RunFolder":
        """Raise a ConfigError naming what is missing unless this is a run folder written by `train`."""
        if not self.root.is_dir():
            raise ConfigError(f"--run {self.root}: no such folder")
        if not self.config.is_file():
            raise ConfigError(f"--run {self.root}: not a run folder (no {self.config.name}); "
                              "give a folder written by `melanoma-siamese train`")
        return self

    def read_json(self, path: Path) -> dict:
        return json.loads(Path(path).read_text())

    def write_json(self, path: Path, value) -> None:
        write_text_atomic(path, json.dumps(value, indent=2))


def write_text_atomic(path: Path, text: str) -> None:
    """Write through a temporary file in the same folder and rename: a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
