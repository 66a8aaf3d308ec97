"""Share of images `predict` flags as unfamiliar (or refuses as no photo), measured through the product's own
path (inference.Predictor + predict_paths, as `melanoma-siamese predict` runs it).

    .venv/bin/python experiments/unfamiliar_rates.py --run RUN [--real DIR] [--generated 200]

Sets: the run's own test part (from split.csv, read from the data the run was trained on); generated cartoon
lesions (data/synth.py, seed 7, not the demo's); 100 flat-colour images; 100 uniform-noise images; with
--real DIR, every image of DIR (e.g. the real sample, for a run trained on generated images). A refused
image (too small, flat) counts as flagged: it gets no answer.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

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
