"""Merge `compare` folders made by several processes into one that `compare --table-only` tabulates:
each part's run folders copied side by side, its runs.csv rows concatenated (a part that did not finish
any row is skipped).

    python experiments/merge_parts.py OUT PART [PART ...]
"""
import shutil
import sys
from pathlib import Path

import pandas as pd


def merge(out: Path, parts: list[Path]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    frames = []
    for part in parts:
        if not (part / "runs.csv").is_file():
            continue
        frames.append(pd.read_csv(part / "runs.csv"))
        for run in part.glob("*/seed*"):
            target = out / run.parent.name / run.name
            if not target.exists():
                shutil.copytree(run, target)
    if frames:
        pd.concat(frames, ignore_index=True).to_csv(out / "runs.csv", index=False)


if __name__ == "__main__":
    merge(Path(sys.argv[1]), [Path(p) for p in sys.argv[2:]])
