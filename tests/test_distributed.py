"""DDP under torchrun: 2 CPU processes with the gloo backend against a single-process run."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from conftest import set_args

ARGS = set_args() + ["--set", "siamese.epochs=2", "--set", "siamese.batch_size=16", "--seed", "0"]


@pytest.mark.slow
def test_two_process_gloo_run(tiny_data, tmp_path):
    single = tmp_path / "single"
    out = subprocess.run([sys.executable, "-m", "melanoma_siamese", "train", "--data", str(tiny_data), "--out",
                          str(single), "--stage", "siamese", *ARGS], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    ddp, trace = tmp_path / "ddp", tmp_path / "trace"
    env = {**os.environ, "MELANOMA_SIAMESE_TRACE": str(trace), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", "-m", "melanoma_siamese", "train",
                          "--data", str(tiny_data), "--out", str(ddp), *ARGS],
                         capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    # One run folder, written by rank 0 only; the split is the single-process one.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp", "single", "trace"]
    assert (ddp / "split.csv").read_text() == (single / "split.csv").read_text()
    assert json.loads((ddp / "run.json").read_text())["world_size"] == 2
    assert run.stdout.count("[Siamese] Epoch 1/") == 1  # epoch lines from rank 0 only
    for epoch in (1, 2):
        r0 = json.loads((trace / f"rank0_epoch{epoch}.json").read_text())
        r1 = json.loads((trace / f"rank1_epoch{epoch}.json").read_text())
        # Each rank trained on its own share of the epoch: no image on both ranks.
        assert not set(r0["rows"]) & set(r1["rows"]) and len(r0["rows"]) == len(r1["rows"])
        assert r0["param_sum"] == r1["param_sum"] and r0["param_head"] == r1["param_head"]
    split = pd.read_csv(ddp / "split.csv")
    train_rows = set(split.index[split["part"] == "train"])
    r0 = json.loads((trace / "rank0_epoch1.json").read_text())
    r1 = json.loads((trace / "rank1_epoch1.json").read_text())
    assert set(r0["rows"]) | set(r1["rows"]) <= train_rows
    metrics = json.loads((ddp / "metrics.json").read_text())
    assert 0.0 <= metrics["test"]["roc_auc"] <= 1.0 and metrics["test"]["n"] > 0
