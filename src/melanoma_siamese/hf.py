"""Sharing a trained run: `export --format hf` writes a folder that huggingface_hub's standard mixin loads
(`MelanomaSiamese.from_pretrained(DIR)`), with what every answer rests on beside the weights.

The folder: `config.json` and `model.safetensors` (encoder + classifier, written by the mixin); the run's
`config.yaml`, `threshold.json`, `trust.json` (calibration, unfamiliar-image rule) and `index.npz` (retrieval
index); `run.json` without the local paths of the data and the command line; `README.md`, the model card (the
run's MODEL_CARD.md where it has one). `api.load_run(DIR)` loads it as a run. Needs the `hub` extra.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from huggingface_hub import PyTorchModelHubMixin

from .errors import ConfigError
from .inference import LoadedRun, PixelModel, RetrievalIndex
from .models import build_classifier, build_encoder
from .runfolder import RunFolder

HUB_TAGS = ("melanoma", "dermoscopy", "metric-learning", "siamese", "image-classification")
# The same weights read back: only float rounding may differ.
TOLERANCE = 1e-5
# run.json keys that name this machine's files (the data, the command line): left out of a shared folder.
PRIVATE_KEYS = ("source", "command")


# A fresh list: the mixin appends its own tags to the one it is given.
class MelanomaSiamese(PixelModel, PyTorchModelHubMixin, library_name="melanoma-siamese", tags=list(HUB_TAGS)):
    """uint8 N x S x S x 3 RGB images (S = image_size) -> (embedding N x 512, L2-normalised; the classifier's
    melanoma score N, uncalibrated). Scaling and normalisation are inside, as in the ONNX export. The
    calibrated probability, threshold and neighbours come from the run around it: use `api.load_run(DIR)`."""

    def __init__(self, encoder: dict, classifier: dict, mean: float, std: float, image_size: int):
        # The arguments are the models' own `args`, as the run's checkpoints store them.
        super().__init__(build_encoder(encoder), build_classifier(classifier), mean, std)
        self.image_size = image_size
        self.eval()


def from_run(run: LoadedRun) -> MelanomaSiamese:
    """The run's encoder and classifier as one mixin model (weights copied, on the CPU)."""
    d = run.config.data
    model = MelanomaSiamese(encoder=dict(run.encoder.args), classifier=dict(run.classifier.args),
                            mean=d.mean, std=d.std, image_size=d.image_size)
    model.encoder.load_state_dict(run.encoder.state_dict())
    model.classifier.load_state_dict(run.classifier.state_dict())
    return model.eval()


def export_hf(run: LoadedRun, out: Path) -> Path:
    """Write the shareable folder for a loaded run; returns it."""
    out.mkdir(parents=True, exist_ok=True)
    from_run(run).save_pretrained(out)
    folder, target = run.folder, RunFolder(out)
    for source, dest in ((folder.config, target.config), (folder.thresholds, target.thresholds),
                         (folder.trust, target.trust), (folder.index, target.index)):
        if source.is_file():
            shutil.copyfile(source, dest)
    info = {k: v for k, v in folder.run_info().items() if k not in PRIVATE_KEYS}
    target.write_json(target.run_json, info)
    (out / "README.md").write_text(model_card(run))
    return out


def model_card(run: LoadedRun) -> str:
    """The Hub's README.md: metadata the Hub reads, then the run's own model card, or a short one from run.json."""
    header = "\n".join(["---", "library_name: melanoma-siamese", "tags:", *[f"- {t}" for t in HUB_TAGS], "---", ""])
    if run.folder.model_card.is_file():
        return header + _without_local_paths(run.folder.model_card.read_text(), run)
    info = run.folder.run_info()
    lines = ["# melanoma-siamese model", "",
             "A research tool, not a medical device. Encoder (" + str(run.encoder.args.get("backbone")) +
             f", {run.config.data.image_size} px) and MLP classifier for melanoma vs not melanoma.", ""]
    if run.generated:
        lines += ["**Trained on generated images: its answers mean nothing for real photos.**", ""]
    lines += [f"- data layout: {info.get('layout', 'unknown')}"]
    lines += [f"- {part} part: {p['images']} images, {p['melanoma']} melanoma"
              for part, p in info.get("parts", {}).items()]
    lines += [f"- threshold on the raw score: {run.thresholds.source}",
              f"- versions: {', '.join(f'{k} {v}' for k, v in info.get('versions', {}).items())}", "",
              "Load with `melanoma_siamese.api.load_run(DIR)` (calibrated probability, decision, unfamiliar flag,",
              "most similar training images) or `MelanomaSiamese.from_pretrained(DIR)` (the network alone).", ""]
    return header + "\n".join(lines)


def _without_local_paths(card: str, run: LoadedRun) -> str:
    """The card names where the data and the run lay on the trainer's machine; a shared copy keeps only
    the folder names (as run.json's copy drops the paths)."""
    try:
        places = [p for p in run.folder.source().values() if p]
    except ConfigError:
        places = []
    places += [run.folder.root]
    spelled = {str(p) for p in places} | {str(Path(p).resolve()) for p in places}
    for text in sorted(spelled, key=len, reverse=True):  # a folder before its parent
        card = card.replace(text, Path(text).name)
    return card


def load_shared(path: Path, device: torch.device) -> LoadedRun:
    """A folder written by export_hf, as a LoadedRun (its data, and so its thumbnails, stay where they were)."""
    model = MelanomaSiamese.from_pretrained(path)
    folder = RunFolder(path)
    return LoadedRun(folder, folder.read_config(), model.encoder.to(device), model.classifier,
                     RetrievalIndex(**folder.read_index()), folder.read_thresholds(), folder.train_prevalence(),
                     device, folder.read_trust())


def compare_with_run(run: LoadedRun, out: Path, pixels: np.ndarray) -> dict:
    """Largest absolute differences between the folder loaded back with from_pretrained and the run's model."""
    loaded = MelanomaSiamese.from_pretrained(out)
    original = from_run(run)
    with torch.no_grad():
        images = torch.from_numpy(np.ascontiguousarray(pixels))
        (e1, p1), (e2, p2) = original(images), loaded(images)
    return {"score": float((p1 - p2).abs().max()), "embedding": float((e1 - e2).abs().max())}


def describe_folder(out: Path) -> Optional[str]:
    """One line listing what the folder holds, for the command's output."""
    names = sorted(p.name for p in Path(out).iterdir() if p.is_file())
    return f"{out}: {', '.join(names)}" if names else None

