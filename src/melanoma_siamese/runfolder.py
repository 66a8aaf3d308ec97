"""The run folder: every path of a run, in one place.

Every module that reads or writes a run goes through `RunFolder`; no other module spells a file name
of the run, and the small files (configuration, run.json, thresholds, index, metrics) are read and
written here. Imports no torch, so light commands can check a folder quickly.
"""
from __future__ import annotations

import io
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .errors import ConfigError

INDEX_ARRAYS = ("embeddings", "ids", "labels", "parts")


@dataclass(frozen=True)
class Thresholds:
    """The decision thresholds of a run, and where they came from (said beside every answer)."""

    classifier: float
    knn: float
    source: str
    record: dict  # as written by evaluate, {} when the run has none


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

    # What the run printed, each line time-stamped (tracking.TrainLog), and TensorBoard's event files and
    # embedding projector (with the `track` extra).
    @property
    def train_log(self) -> Path:
        return self.root / "train.log"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

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
    def metrics_by_group(self) -> Path:
        return self.root / "metrics_by_group.json"

    @property
    def model_card(self) -> Path:
        return self.root / "MODEL_CARD.md"

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

    # A K-fold ensemble (data.folds): each member is a run folder of its own; the fold of each training image,
    # the members' out-of-fold predictions and their summary sit beside the ensemble's files.
    def fold(self, index: int) -> "RunFolder":
        return RunFolder(self.root / "folds" / f"fold{index}")

    @property
    def folds_file(self) -> Path:
        return self.root / "folds.csv"

    @property
    def oof(self) -> Path:
        return self.root / "oof_predictions.csv"

    @property
    def folds_summary(self) -> Path:
        return self.root / "folds.json"

    def read_folds_summary(self) -> Optional[dict]:
        return self.read_json(self.folds_summary) if self.folds_summary.is_file() else None

    def external(self, name: str) -> "RunFolder":
        """Where `evaluate --data OTHER` writes: a run-shaped folder of its own under external/."""
        return RunFolder(self.root / "external" / name)

    def owned(self) -> list[Path]:
        """Every file and folder of this run that exists (anything else in the folder, such as the demo's
        generated data/, is not the run's)."""
        named = [self.config, self.run_json, self.split, self.skipped_images, self.train_log, self.tensorboard,
                 self.models, self.state().parent, self.index, self.thresholds, self.metrics, self.metrics_by_group,
                 self.model_card, self.predictions, self.baseline, self.images, self.fold(0).root.parent,
                 self.folds_file, self.oof, self.folds_summary, self.trust, self.root / "external"]
        return [p for p in named + sorted(self.root.glob("history_*.jsonl")) if p.exists()]

    def holds_run(self) -> bool:
        """Whether a run (finished or not) was written here: `train` refuses to mix a new one into it."""
        return any(p.exists() for p in (self.config, self.models, self.state().parent, self.metrics))

    def clear(self) -> None:
        """Remove this run's files before a new run is written here, so none of the old one is left to mix
        with it (an old model beside a new configuration would answer wrongly without a word)."""
        import shutil

        for path in self.owned():
            # A link is removed as a link: what it points to is not the run's.
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()

    def holding(self, paths: Sequence[Optional[Path]]) -> list[Path]:
        """Those of `paths` that lie inside one of this run's own files or folders (clear would remove them)."""
        owned = [p.resolve() for p in self.owned()]
        found = []
        for path in paths:
            if path is None:
                continue
            resolved = Path(path).resolve()
            if any(resolved == o or o in resolved.parents for o in owned):
                found.append(Path(path))
        return found

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

    def read_config(self, overrides: Sequence[str] = ()):
        """The run's own resolved configuration, with `--set` overrides on top."""
        from .config import load_config

        return load_config(self.require_trained().config, list(overrides))

    def run_info(self) -> dict:
        """run.json (what `train` recorded: data source, parts, versions); {} when absent."""
        return self.read_json(self.run_json) if self.run_json.is_file() else {}

    def source(self) -> dict[str, Optional[Path]]:
        """The data the run was trained on: `data`, `metadata`, `images` (each a path or None)."""
        saved = self.run_info().get("source")
        if saved is None:
            raise ConfigError(f"{self.run_json} is missing or names no data source; give --data")
        return {k: Path(saved[k]) if saved.get(k) else None for k in ("data", "metadata", "images")}

    def read_split(self):
        """split.csv as a DataFrame with the clinical columns (age, sex, site, skin_type), empty where a run
        written before they existed lacks them."""
        import pandas as pd

        from .data.clinical import with_clinical

        split = pd.read_csv(self.split, dtype={"isic_id": str, "patient_id": str, "sex": str, "site": str,
                                               "skin_type": str}, keep_default_na=False, na_values={"age": [""]})
        return with_clinical(split)

    def train_prevalence(self) -> Optional[float]:
        train = self.run_info().get("parts", {}).get("train")
        return train["melanoma"] / train["images"] if train and train.get("images") else None

    def read_thresholds(self) -> Thresholds:
        if not self.thresholds.is_file():
            return Thresholds(0.5, 0.5, f"0.5 (the run has no {self.thresholds.name} with a validation-chosen "
                              "threshold)", {})
        record = self.read_json(self.thresholds)
        return Thresholds(float(record["classifier"]), float(record.get("knn", 0.5)),
                          f"chosen on the validation part ({record.get('rule', 'unknown rule')})", record)

    def write_thresholds(self, record: dict) -> None:
        self.write_json(self.thresholds, record)

    def read_index(self) -> dict[str, np.ndarray]:
        """The retrieval index: L2-normalised embeddings, ids, labels and parts of train and val images."""
        if not self.index.is_file():
            raise ConfigError(f"{self.root} has no {self.index.name} (the retrieval index); `melanoma-siamese "
                              f"evaluate --run {self.root}` writes it")
        with np.load(self.index) as data:
            out = {"embeddings": data["embeddings"].astype(np.float32), "ids": data["ids"].astype(str),
                   "labels": data["labels"].astype(int), "parts": data["parts"].astype(str)}
            # Written since the unfamiliar-image rule's appearance check; older indexes lack it.
            out["appearance"] = data["appearance"].astype(np.float32) if "appearance" in data.files else None
            return out

    def write_index(self, embeddings: np.ndarray, ids: np.ndarray, labels: np.ndarray, parts: np.ndarray,
                    appearance: Optional[np.ndarray] = None) -> None:
        buffer = io.BytesIO()
        extra = {} if appearance is None else {"appearance": np.asarray(appearance, dtype=np.float32)}
        np.savez(buffer, embeddings=np.asarray(embeddings, dtype=np.float32), ids=np.asarray(ids).astype(str),
                 labels=np.asarray(labels), parts=np.asarray(parts).astype(str), **extra)
        write_bytes_atomic(self.index, buffer.getvalue())

    def read_metrics(self) -> dict:
        return self.read_json(self.metrics)

    def write_metrics(self, metrics: dict) -> None:
        self.write_json(self.metrics, metrics)

    def read_baseline(self) -> Optional[dict]:
        return self.read_json(self.baseline) if self.baseline.is_file() else None

    @property
    def trust(self) -> Path:
        return self.root / "trust.json"

    def read_trust(self) -> dict:
        """Calibration, the unfamiliar-image rule and what the run was trained on, as `evaluate` wrote them
        (empty for a run evaluated before they existed)."""
        return self.read_json(self.trust) if self.trust.is_file() else {}

    def write_trust(self, record: dict) -> None:
        self.write_json(self.trust, record)


def write_text_atomic(path: Path, text: str) -> None:
    """Write through a temporary file in the same folder and rename: a reader never sees half a file."""
    write_bytes_atomic(path, text.encode())


def write_bytes_atomic(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
