"""A generated dataset in the Kaggle ISIC layout, so the whole pipeline runs without a download.

Two lesion kinds drawn from the same size, position and colour distributions: benign lesions are
regular ellipses of one colour; "melanoma" ones have an irregular border and several colour patches
(the A, B and C of the ABCD rule). Colour statistics overlap, so an untrained network's embedding
separates them only partly; training has to learn shape and pattern.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image


def _lesion(size: int, melanoma: bool, rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    skin = np.array([0.85, 0.65, 0.55]) + rng.normal(0, 0.05, 3)
    image = np.broadcast_to(skin, (size, size, 3)).copy()
    image += rng.normal(0, 0.02, (size, size, 3))
    cy, cx = rng.uniform(0.35, 0.65, 2)
    ry, rx = rng.uniform(0.14, 0.3, 2)
    angle = rng.uniform(0, np.pi)
    dy, dx = yy - cy, xx - cx
    u = (dx * np.cos(angle) + dy * np.sin(angle)) / rx
    v = (-dx * np.sin(angle) + dy * np.cos(angle)) / ry
    radius = np.sqrt(u**2 + v**2)
    theta = np.arctan2(v, u)
    if melanoma:
        wobble = sum(rng.uniform(0.08, 0.2) * np.sin(k * theta + rng.uniform(0, 2 * np.pi)) for k in (3, 5, 7))
        inside = radius < 1 + wobble
    else:
        inside = radius < 1 + 0.03 * np.sin(2 * theta + rng.uniform(0, 2 * np.pi))
    base = np.array([0.45, 0.28, 0.18]) * rng.uniform(0.6, 1.2) + rng.normal(0, 0.04, 3)
    lesion = np.broadcast_to(base, (size, size, 3)).copy()
    if melanoma:
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


def make_synthetic_dataset(out_dir: Path, n_images: int = 400, melanoma_fraction: float = 0.25,
                           images_per_patient: tuple[int, int] = (2, 6), size: int = 64, seed: int = 0) -> Path:
    """Write train-metadata.csv and train-image/image/<isic_id>.jpg under out_dir; return out_dir."""
    out_dir = Path(out_dir)
    image_dir = out_dir / "train-image" / "image"
    image_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    patient = 0
    while len(rows) < n_images:
        patient += 1
        for _ in range(int(rng.integers(images_per_patient[0], images_per_patient[1] + 1))):
            if len(rows) >= n_images:
                break
            image_id = f"ISIC_{9000000 + len(rows):07d}"
            target = int(rng.random() < melanoma_fraction)
            Image.fromarray(_lesion(size, bool(target), rng)).save(image_dir / f"{image_id}.jpg", quality=92)
            rows.append({"isic_id": image_id, "patient_id": f"IP_{patient:06d}", "target": target,
                         "diagnosis": "melanoma" if target else "nevus", "synthetic": True})
    pd.DataFrame(rows).to_csv(out_dir / "train-metadata.csv", index=False)
    return out_dir
