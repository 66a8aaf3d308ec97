"""A generated dataset in the Kaggle ISIC layout, so the whole pipeline runs without a download.

Two lesion kinds drawn from the same size, position and colour distributions: benign lesions are
regular ellipses of one colour; "melanoma" ones have an irregular border and several colour patches
(the A, B and C of the ABCD rule). Colour statistics overlap, so an untrained network's embedding
separates them only partly; training has to learn shape and pattern.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd
from PIL import Image


def patient_style(rng: np.random.Generator) -> dict:
    """One patient's look: skin tone, lesion colour, size, shape and orientation, drawn from the population."""
    return {"skin": np.array([0.85, 0.65, 0.55]) + rng.normal(0, 0.05, 3), "radii": rng.uniform(0.14, 0.3, 2),
            "angle": rng.uniform(0, np.pi), "base": np.array([0.45, 0.28, 0.18]) * rng.uniform(0.6, 1.2)
            + rng.normal(0, 0.04, 3)}


def _lesion(size: int, melanoma: bool, rng: np.random.Generator, style: Optional[dict] = None) -> np.ndarray:
    """A lesion image. With `style` (a patient's), the lesion takes that style with a little jitter, and a
    melanoma has only a faint irregularity: what sets it apart is being unlike the patient's other lesions."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    skin = np.array([0.85, 0.65, 0.55]) + rng.normal(0, 0.05, 3) if style is None else style["skin"]
    image = np.broadcast_to(skin, (size, size, 3)).copy()
    image += rng.normal(0, 0.02, (size, size, 3))
    cy, cx = rng.uniform(0.35, 0.65, 2)
    ry, rx = rng.uniform(0.14, 0.3, 2) if style is None else style["radii"] * rng.uniform(0.93, 1.07, 2)
    angle = rng.uniform(0, np.pi) if style is None else style["angle"] + rng.normal(0, 0.1)
    dy, dx = yy - cy, xx - cx
    u = (dx * np.cos(angle) + dy * np.sin(angle)) / rx
    v = (-dx * np.sin(angle) + dy * np.cos(angle)) / ry
    radius = np.sqrt(u**2 + v**2)
    theta = np.arctan2(v, u)
    if melanoma and style is None:
        wobble = sum(rng.uniform(0.08, 0.2) * np.sin(k * theta + rng.uniform(0, 2 * np.pi)) for k in (3, 5, 7))
        inside = radius < 1 + wobble
    elif melanoma:
        inside = radius < 1 + rng.uniform(0.03, 0.07) * np.sin(3 * theta + rng.uniform(0, 2 * np.pi))
    else:
        inside = radius < 1 + 0.03 * np.sin(2 * theta + rng.uniform(0, 2 * np.pi))
    if style is None:
        base = np.array([0.45, 0.28, 0.18]) * rng.uniform(0.6, 1.2) + rng.normal(0, 0.04, 3)
    else:
        base = style["base"] * rng.uniform(0.96, 1.04) + rng.normal(0, 0.01, 3)
    lesion = np.broadcast_to(base, (size, size, 3)).copy()
    if melanoma and style is None:
        for _ in range(rng.integers(2, 4)):
            py, px = cy + rng.normal(0, ry / 2), cx + rng.normal(0, rx / 2)
            blob = ((yy - py) ** 2 + (xx - px) ** 2) < rng.uniform(0.03, 0.08) ** 2
            tone = np.array([0.25, 0.25, 0.35]) * rng.uniform(0.6, 1.4) if rng.random() < 0.5 else base * 0.5
            lesion[blob] = tone
    else:
        shade = 1 - 0.15 * np.clip(radius, 0, 1)
        lesion = lesion * shade[..., None]
    image[inside] = lesion[inside]
    return (np.clip(image, 0, 1) * 255).astype(np.uint8)


def clinical_metadata(n: int, seed: int) -> dict[str, list]:
    """Age, sex and site for n generated images, with some missing, independent of the label (they carry no
    signal here); drawn from their own stream so the images are the same with or without them."""
    rng = np.random.default_rng([seed, 7])
    age = np.round(rng.uniform(20, 85, n) / 5) * 5
    sites = np.array(["torso", "lower extremity", "upper extremity", "head/neck", "palms/soles", ""])
    return {"age_approx": [a if rng.random() > 0.05 else None for a in age],
            "sex": list(rng.choice(["female", "male", ""], n, p=[0.48, 0.48, 0.04])),
            "anatom_site_general": list(rng.choice(sites, n, p=[0.45, 0.2, 0.15, 0.12, 0.03, 0.05]))}


GENERATED_MARKER = "GENERATED.txt"


def make_synthetic_dataset(out_dir: Path, n_images: int = 400, melanoma_fraction: float = 0.25,
                           images_per_patient: tuple[int, int] = (2, 6), size: int = 64, seed: int = 0,
                           patient_styles: bool = False) -> Path:
    """Write train-metadata.csv (with age, sex and site carrying no signal) and train-image/image/<isic_id>.jpg
    under out_dir; return out_dir.

    patient_styles: each patient has their own benign style (patient_style), and at most one melanoma per
    patient, drawn in another style from the population's range: the case patient context is for."""
    out_dir = Path(out_dir)
    image_dir = out_dir / "train-image" / "image"
    image_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    patient = 0
    while len(rows) < n_images:
        patient += 1
        style, had_melanoma = (patient_style(rng) if patient_styles else None), False
        for _ in range(int(rng.integers(images_per_patient[0], images_per_patient[1] + 1))):
            if len(rows) >= n_images:
                break
            image_id = f"ISIC_{9000000 + len(rows):07d}"
            target = int(rng.random() < melanoma_fraction and not (patient_styles and had_melanoma))
            look = patient_style(rng) if patient_styles and target else style
            had_melanoma = had_melanoma or bool(target)
            Image.fromarray(_lesion(size, bool(target), rng, look)).save(image_dir / f"{image_id}.jpg", quality=92)
            rows.append({"isic_id": image_id, "patient_id": f"IP_{patient:06d}", "target": target,
                         "diagnosis": "melanoma" if target else "nevus", "synthetic": True})
    table = pd.DataFrame(rows)
    table = table.assign(**clinical_metadata(len(table), seed))
    table.to_csv(out_dir / "train-metadata.csv", index=False)
    (out_dir / GENERATED_MARKER).write_text("Generated by melanoma-siamese synth: cartoons, not photographs.\n")
    return out_dir


def is_generated(data_dir: Optional[Path]) -> bool:
    """Whether a dataset folder was written by `make_synthetic_dataset` (its marker file, or the `synthetic`
    column of its metadata in folders written before the marker)."""
    if data_dir is None:
        return False
    data_dir = Path(data_dir)
    if (data_dir / GENERATED_MARKER).is_file():
        return True
    metadata = data_dir / "train-metadata.csv"
    if not metadata.is_file():
        return False
    with open(metadata) as f:
        return "synthetic" in f.readline().strip().split(",")
