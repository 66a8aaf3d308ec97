"""Plain-dict checkpoints: written atomically, read with weights_only=True, rebuildable from the file alone."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError  # noqa: F401  (re-exported)
from .models import EnsembleEncoder, Encoder, build_classifier, build_encoder

# The layout of a model file; load_model refuses any other, so a future change cannot be misread silently.
FORMAT = 1
PREFIXES = ("module.", "_orig_mod.")


def atomic_save(obj: Any, path: Path) -> None:
    """Temporary file in the same folder, flushed to disk, then renamed over the target."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys saved from DDP (`module.`) or torch.compile (`_orig_mod.`) wrappers."""
    out = {}
    for key, value in state.items():
        changed = True
        while changed:
            changed = False
            for prefix in PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix):], True
        out[key] = value
    return out


def _read(path: Path, what: str, absent: str) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(absent)
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{what} {path} cannot be read (truncated or not a {what}): {exc}") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} is not a melanoma-siamese {what}")
    return data


def load_checkpoint(path: Path) -> dict:
    data = _read(path, "checkpoint", f"checkpoint {path} does not exist")
    if "state_dict" not in data or "kind" not in data:
        raise CheckpointError(f"checkpoint {path} is not a melanoma-siamese checkpoint (no 'kind'/'state_dict')")
    if data.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} has format {data.get('format')!r}; this version of melanoma-siamese "
                              f"reads format {FORMAT} (retrain, or use the version that wrote it)")
    return data


def load_training_state(path: Path) -> dict:
    """The end-of-epoch training state `train --resume` continues from."""
    data = _read(path, "training state",
                 f"nothing to resume: {path} does not exist (it is written at the end of each epoch)")
    if data.get("stage") != "siamese":
        raise CheckpointError(f"{path} is not a melanoma-siamese training state")
    data["model"] = strip_prefixes(data["model"])
    return data


def save_model(model: torch.nn.Module, path: Path, **extra: Any) -> None:
    kind = "siamese" if isinstance(model, (Encoder, EnsembleEncoder)) else "classifier"
    atomic_save({"format": FORMAT, "kind": kind, "args": dict(model.args),
                 "state_dict": model.state_dict(), **extra}, path)


def load_model(path: Path, kind: str) -> tuple[torch.nn.Module, dict]:
    data = load_checkpoint(path)
    if data["kind"] != kind:
        raise CheckpointError(f"checkpoint {path} holds a {data['kind']} model, expected a {kind} model")
    model = build_encoder(data["args"]) if kind == "siamese" else build_classifier(data["args"])
    try:
        model.load_state_dict(strip_prefixes(data["state_dict"]))
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint {path} does not fit the {kind} model it describes: {exc}") from exc
    model.eval()
    return model, data
