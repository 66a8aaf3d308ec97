"""Share of images `predict` flags as unfamiliar (or refuses as no photo), measured through the product's own
path (inference.Predictor + predict_paths, as `melanoma-siamese predict` runs it).

    .venv/bin/python experiments/unfamiliar_rates.py --run RUN [--real DIR] [--generated 200]

Sets: the run's own test part (from split.csv, read from the data the run was trained on); generated cartoon
lesions (data/synth.py, seed 7, not the demo's); 100 flat-colour images; 100 uniform-noise images; and the
harder families a new-user trial found passing as familiar on a 64 px run, 100 each at 256 px: blurred noise,
two-colour gradients, text on a plain ground, checkerboards, random shapes (drawn rectangles and ellipses);
with --real DIR, every image of DIR (e.g. the real sample, for a run trained on generated images). A refused
image (too small, flat) counts as flagged: it gets no answer.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from melanoma_siamese.data.synth import make_synthetic_dataset
from melanoma_siamese.inference import Predictor, load_run, predict_paths
from melanoma_siamese.inputs import expand_inputs


def _write(folder: Path, images: np.ndarray) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, pixels in enumerate(images):
        paths.append(folder / f"{i:04d}.png")
        Image.fromarray(pixels).save(paths[-1])
    return paths


def _hard_families(rng: np.random.Generator, n: int = 100, side: int = 256) -> dict[str, list[Image.Image]]:
    """Images unlike any dermoscopic photo whose texture or colour alone does not give them away."""
    families: dict[str, list[Image.Image]] = {k: [] for k in ("blurred noise", "gradients", "text", "checkerboards",
                                                              "random shapes")}
    try:
        font = ImageFont.load_default(size=side // 10)
    except TypeError:  # Pillow before 10.1 has only its small bitmap font (the package's floor is 10.0)
        font = ImageFont.load_default()
    words = "lesion report patient visit image scale ruler note date left right ISIC sample".split()
    yy, xx = np.mgrid[0:side, 0:side] / (side - 1)
    for _ in range(n):
        noise = Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8))
        families["blurred noise"].append(noise.filter(ImageFilter.GaussianBlur(float(rng.uniform(2, 12)))))
        angle = rng.uniform(0, 2 * np.pi)
        t = (np.cos(angle) * xx + np.sin(angle) * yy)
        t = (t - t.min()) / (t.max() - t.min())
        a, b = rng.integers(0, 256, (2, 3))
        families["gradients"].append(Image.fromarray((a + (b - a) * t[..., None]).astype(np.uint8)))
        ground = tuple(int(v) for v in rng.integers(180, 256, 3))
        page = Image.new("RGB", (side, side), ground)
        draw = ImageDraw.Draw(page)
        for line in range(int(rng.integers(3, 9))):
            text = " ".join(rng.choice(words, 3))
            draw.text((int(rng.integers(0, side // 4)), 8 + line * side // 9), text,
                      fill=tuple(int(v) for v in rng.integers(0, 120, 3)), font=font)
        families["text"].append(page)
        cell, (c1, c2) = int(rng.integers(8, 64)), rng.integers(0, 256, (2, 3))
        board = ((np.arange(side)[:, None] // cell + np.arange(side)[None, :] // cell) % 2)[..., None]
        families["checkerboards"].append(Image.fromarray(np.where(board, c1, c2).astype(np.uint8)))
        canvas = Image.new("RGB", (side, side), tuple(int(v) for v in rng.integers(0, 256, 3)))
        draw = ImageDraw.Draw(canvas)
        for _ in range(int(rng.integers(3, 12))):
            x0, y0 = rng.integers(0, side, 2)
            box = [int(x0), int(y0), int(x0 + rng.integers(10, side // 2)), int(y0 + rng.integers(10, side // 2))]
            fill = tuple(int(v) for v in rng.integers(0, 256, 3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
        families["random shapes"].append(canvas)
    return families


def _sets(run, work: Path, generated: int, real: Path | None) -> dict[str, list[Path]]:
    split = pd.read_csv(run.folder.split, dtype={"isic_id": str})
    test_ids = split.loc[split["part"] == "test", "isic_id"]
    sets = {"own test part": [Path(run.image_paths[i]) for i in test_ids if i in run.image_paths]}
    synth = make_synthetic_dataset(work / "generated", generated, seed=7)
    sets["generated cartoons"] = expand_inputs([synth / "train-image" / "image"])
    rng = np.random.default_rng(0)
    side = max(run.config.data.image_size, 64)
    colours = rng.integers(0, 256, (100, 1, 1, 3), dtype=np.uint8)
    sets["flat colour"] = _write(work / "flat", np.broadcast_to(colours, (100, side, side, 3)).copy())
    sets["uniform noise"] = _write(work / "noise", rng.integers(0, 256, (100, side, side, 3), dtype=np.uint8))
    for name, images in _hard_families(rng).items():
        sets[name] = _write(work / name.replace(" ", "-"), np.stack([np.asarray(i) for i in images]))
    if real is not None:
        sets[f"real: {real.name}"] = expand_inputs([real])
    return sets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--real", type=Path)
    parser.add_argument("--generated", type=int, default=200)
    args = parser.parse_args()
    run = load_run(args.run, "cpu")
    predictor = Predictor(run)
    print(f"{'set':<28} {'images':>6} {'flagged':>8} {'refused':>8} {'either':>7}")
    with tempfile.TemporaryDirectory() as work:
        for name, paths in _sets(run, Path(work), args.generated, args.real).items():
            rows = pd.DataFrame(predict_paths(predictor, paths))
            refused = (rows["status"] != "ok").mean()
            flagged = rows.get("unfamiliar", pd.Series(False, index=rows.index)).fillna(False).astype(bool).mean()
            print(f"{name:<28} {len(rows):>6} {100 * flagged:>7.1f}% {100 * refused:>7.1f}% "
                  f"{100 * (flagged + refused):>6.1f}%")


if __name__ == "__main__":
    main()
