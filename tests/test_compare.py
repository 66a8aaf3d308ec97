from pathlib import Path

import pandas as pd
import pytest

from melanoma_siamese.cli import main

from helpers import set_args

BUDGET, BATCH = 64, 16

# Each trains tiny runs end to end (tens of seconds on 2 cores).
pytestmark = pytest.mark.slow


def test_compare_writes_table_and_resumes(tiny_data, tmp_path, capsys, monkeypatch):
    out = tmp_path / "cmp"
    args = ["compare", "--data", str(tiny_data), "--configs", "configs/demo.yaml", "configs/plain-ce.yaml",
            "--seeds", "0", "--out", str(out), *set_args(), "--set", "siamese.epochs=1",
            "--set", f"siamese.budget_images={BUDGET}", "--set", f"siamese.batch_size={BATCH}"]
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    assert main(args) == 0
    table = pd.read_csv(out / "comparison.csv")
    assert list(table["recipe"]) == ["demo", "plain-ce"]
    assert "test ROC AUC" in table.columns and "pAUC >80% sens. (ISIC 2024, max 0.2)" in table.columns
    md = (out / "comparison.md").read_text()
    assert "| recipe |" in md and "Paired patient bootstrap" in md
    runs = pd.read_csv(out / "runs.csv")
    assert len(runs) == 2 and (runs["seed"] == 0).all()
    # Every run shares one split.
    assert (out / "demo" / "seed0" / "split.csv").read_text() == (out / "plain-ce" / "seed0" / "split.csv").read_text()
    # The budget is a cap on backbone passes: each recipe spends it, and overshoots by less than one batch
    # (a triplet batch passes 3 images per item through the backbone).
    assert (runs["backbone_passes"] >= BUDGET).all() and (runs["backbone_passes"] < BUDGET + 3 * BATCH).all(), runs
    assert "backbone passes" in table.columns
    stamp = (out / "demo" / "seed0" / "metrics.json").stat().st_mtime_ns
    capsys.readouterr()
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "demo seed 0: done, kept" in printed and "plain-ce seed 0: done, kept" in printed
    assert (out / "demo" / "seed0" / "metrics.json").stat().st_mtime_ns == stamp
    assert len(pd.read_csv(out / "runs.csv")) == 2
    # --table-only trains nothing: a seed never run is reported as missing and the table keeps seed 0.
    capsys.readouterr()
    assert main(args[:args.index("--seeds")] + ["--seeds", "0", "1"] + args[args.index("--seeds") + 2:]
                + ["--table-only"]) == 0
    printed = capsys.readouterr().out
    assert "demo seed 1: not finished, left out of the table (--table-only)" in printed
    assert not (out / "demo" / "seed1").exists() and len(pd.read_csv(out / "runs.csv")) == 2
