"""Measure the trust pieces on a trained run: calibration, unfamiliar-image flags, and where saliency points.

    .venv/bin/python experiments/trust_measure.py --run /work/runs/ham-trust [--out DIR]

On the run's own split (its images re-decoded as training decoded them, at the run's image size):
- calibration: Platt (and temperature) fitted on the validation part, Brier and ECE on the test part;
- unfamiliar images: share flagged among the test part, generated cartoon lesions (data/synth.py, another
  seed than the demo's), flat-colour images and uniform noise: by the embedding (k = 1 and the run's k),
  by appearance (familiarity.appearance_features), by either, at the run's quantile; and what the pixel
  checks (familiarity.image_problems) say of each set;
- saliency on the test melanomas: the share of the Grad-CAM map's mass inside the lesion against a
  uniform map's share (= the lesion's share of the image), at the stage saliency.choose_stage picks and
  at the others. Lesion mask: Otsu's threshold on the grey image (after a 5x5 Gaussian blur), the dark
  side, its connected component holding most of the darkest 2% of the central half's pixels (dark
  corners and shading are then not taken for the lesion), holes filled. A map that is zero everywhere
  (Grad-CAM found no positive evidence at that stage) counts as 0 inside.

--foreign NAME=FOLDER adds the share flagged among the .jpg/.png images of FOLDER (e.g. the real sample
for a run trained on generated images).

Prints the numbers and writes them as JSON (and a few pictures to look at) into --out.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import torch
from PIL import Image
from scipy import ndimage

from melanoma_siamese import calibration, familiarity, plots
from melanoma_siamese.checkpoint import load_model
from melanoma_siamese.config import load_config
from melanoma_siamese.data.metadata import read_dataset
from melanoma_siamese.data.synth import make_synthetic_dataset
from melanoma_siamese.preprocess import to_model_input
from melanoma_siamese.runfolder import RunFolder
from melanoma_siamese.saliency import overlay, saliency_maps, stages


def decode(path: Path, size: int) -> np.ndarray:
    """As training decodes a file: RGB, bilinear resize to size x size."""
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB").resize((size, size), Image.BILINEAR), dtype=np.uint8)


def score(encoder, classifier, pixels: np.ndarray, mean: float, std: float, batch: int = 64):
    """Embeddings and raw melanoma scores (softmax[:, 1]) of N x S x S x 3 uint8 images."""
    embeddings, scores = [], []
    with torch.no_grad():
        for start in range(0, len(pixels), batch):
            e = encoder(to_model_input(torch.from_numpy(pixels[start:start + batch]), mean, std))
            embeddings.append(e.numpy())
            scores.append(torch.softmax(classifier(e), dim=1)[:, 1].numpy())
    return np.concatenate(embeddings), np.concatenate(scores)


def lesion_mask(pixels: np.ndarray) -> np.ndarray:
    """The dark region: Otsu on the blurred grey image, its connected component holding most of the darkest
    2% of the central half's pixels (the lesion's core; dark corners and shading are then not taken for
    the lesion), holes filled."""
    import cv2

    grey = cv2.GaussianBlur(cv2.cvtColor(pixels, cv2.COLOR_RGB2GRAY), (5, 5), 0)
    _, dark = cv2.threshold(grey, 0, 1, cv2.THRESH_BINARY_INV + cv2.THRESH_OTSU)
    labels, count = ndimage.label(dark)
    s = grey.shape[0]
    centre, centre_labels = grey[s // 4:3 * s // 4, s // 4:3 * s // 4], labels[s // 4:3 * s // 4, s // 4:3 * s // 4]
    votes = np.bincount(centre_labels[centre <= np.quantile(centre, 0.02)], minlength=count + 1)
    votes[0] = 0
    if votes.max() == 0:
        return np.zeros(grey.shape, dtype=bool)
    return ndimage.binary_fill_holes(labels == int(np.argmax(votes)))


def load(run: RunFolder):
    config = load_config(run.config)
    encoder, _ = load_model(run.siamese, "siamese")
    classifier, _ = load_model(run.classifier, "classifier")
    source = json.loads(run.run_json.read_text())["source"]
    table = read_dataset(*(Path(source[k]) if source.get(k) else None for k in ("data", "metadata", "images"))).table
    split = pd.read_csv(run.split).merge(table[["isic_id", "path"]], on="isic_id")
    return config, encoder.eval(), classifier.eval(), split


def measure_calibration(labels: dict, scores: dict, out: Path) -> dict:
    result = {}
    for method in ("platt", "temperature"):
        cal = calibration.fit(labels["val"], scores["val"], method)
        result[method] = {"fit": cal.to_dict(), "test": calibration.report(cal, labels["test"], scores["test"])}
    cal = calibration.fit(labels["val"], scores["val"], "platt")
    plots.reliability_before_after(labels["test"], {"raw score": scores["test"],
                                                    "calibrated (platt)": calibration.apply(cal, scores["test"])},
                                   out / "reliability.png")
    return result


def odd_images(size: int, seed: int = 99) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory() as tmp:
        data = make_synthetic_dataset(Path(tmp) / "synth", n_images=200, size=64, seed=seed)
        files = sorted((Path(data) / "train-image" / "image").glob("*.jpg"))
        generated = np.stack([decode(f, size) for f in files])
    colours = rng.integers(0, 256, (100, 3))
    flat = np.broadcast_to(colours[:, None, None, :], (100, size, size, 3)).astype(np.uint8)
    noise = rng.integers(0, 256, (100, size, size, 3), dtype=np.uint8)
    return {"generated": generated, "flat colour": flat, "uniform noise": noise}


def measure_familiarity(embeddings: dict, pixels: dict, config) -> dict:
    """Share flagged per image set: by the embedding (k = 1 and the run's k), by appearance, by either."""
    e, d = config.evaluation, config.data
    sets = [name for name in embeddings if name != "train"]
    appearance = {name: familiarity.appearance_features(images) for name, images in pixels.items()}
    result, flags = {}, {}
    for k in sorted({1, e.unfamiliar_k}):
        model = familiarity.fit(embeddings["train"], embeddings["val"], k=k, quantile=e.unfamiliar_quantile)
        flags[k] = {name: model.assess(embeddings[name])["unfamiliar"] for name in sets}
        result[f"embedding k={k}"] = {"record": model.record(),
                                      "flagged": {name: float(f.mean()) for name, f in flags[k].items()}}
    model = familiarity.fit(appearance["train"], appearance["val"], k=e.unfamiliar_k, quantile=e.unfamiliar_quantile)
    looks = {name: model.assess(appearance[name])["unfamiliar"] for name in sets}
    result["appearance"] = {"record": model.record(), "flagged": {name: float(f.mean()) for name, f in looks.items()}}
    result["either"] = {name: float((flags[e.unfamiliar_k][name] | looks[name]).mean()) for name in sets}
    result["pixel_checks_refuse"] = {
        name: float(np.mean([bool(familiarity.image_problems(p, d.min_image_side, d.min_image_std)) for p in images]))
        for name, images in pixels.items() if name not in ("train", "val")}
    return result


def measure_saliency(run_like, melanomas: np.ndarray, out: Path) -> dict:
    masks = np.stack([lesion_mask(p) for p in melanomas])
    area = masks.mean(axis=(1, 2))
    result = {"n": int(len(melanomas)), "lesion_area_share_mean": float(area.mean())}
    default = saliency_maps(run_like, melanomas[:1])[1].name
    for name, _ in stages(run_like.encoder):
        maps, stage = saliency_maps(run_like, melanomas, stage_name=name)
        inside = (maps * masks).sum(axis=(1, 2)) / np.maximum(maps.sum(axis=(1, 2)), 1e-12)
        result[name] = {"cells": stage.cells, "chosen": name == default,
                        "mass_inside_mean": float(inside.mean()), "mass_inside_median": float(np.median(inside)),
                        "ratio_to_uniform_mean": float(np.mean(inside / np.maximum(area, 1e-12))),
                        "share_above_uniform": float(np.mean(inside > area)),
                        "share_no_evidence": float(np.mean(maps.max(axis=(1, 2)) == 0))}
        if name == default:
            pictures = [overlay(p, m) for p, m in zip(melanomas[:8], maps[:8])]
            pictures += [np.where(mk[..., None], p, p // 3) for p, mk in zip(melanomas[:8], masks[:8])]
            plots.image_grid(np.stack(pictures), [f"{v:.2f} in" for v in inside[:8]] + ["mask"] * 8,
                             out / "saliency_test_melanomas.png",
                             f"Grad-CAM at {stage.name} ({stage.cells}x{stage.cells}); lesion masks below")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=None, help="default: RUN/trust-measure")
    parser.add_argument("--foreign", action="append", default=[], metavar="NAME=FOLDER",
                        help="also the share flagged among these images (repeatable)")
    args = parser.parse_args()
    torch.set_grad_enabled(True)
    run = RunFolder(args.run)
    out = args.out or run.root / "trust-measure"
    out.mkdir(parents=True, exist_ok=True)
    config, encoder, classifier, split = load(run)
    d = config.data
    pixels = {part: np.stack([decode(p, d.image_size) for p in split[split["part"] == part]["path"]])
              for part in ("train", "val", "test")}
    labels = {part: split[split["part"] == part]["target"].to_numpy() for part in pixels}
    embeddings, scores = {}, {}
    for part in pixels:
        embeddings[part], scores[part] = score(encoder, classifier, pixels[part], d.mean, d.std)
    pixels.update(odd_images(d.image_size))
    for item in args.foreign:
        name, folder = item.split("=", 1)
        files = sorted(f for f in Path(folder).rglob("*") if f.suffix.lower() in (".jpg", ".jpeg", ".png"))
        pixels[name] = np.stack([decode(f, d.image_size) for f in files])
    for name in pixels:
        if name not in embeddings:
            embeddings[name], _ = score(encoder, classifier, pixels[name], d.mean, d.std)
    run_like = SimpleNamespace(config=config, encoder=encoder, classifier=classifier, device=torch.device("cpu"))
    results = {"run": str(run.root), "image_size": d.image_size, "backbone": config.model.backbone,
               "calibration": measure_calibration(labels, scores, out),
               "familiarity": measure_familiarity(embeddings, pixels, config),
               "saliency": measure_saliency(run_like, pixels["test"][labels["test"] == 1], out)}
    (out / "trust_measure.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
