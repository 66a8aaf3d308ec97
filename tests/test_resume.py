"""Fault tolerance: SIGKILL mid-epoch, resume, and end bit for bit where an uninterrupted run ends."""
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from melanoma_siamese.checkpoint import CheckpointError, load_training_state

from helpers import set_args

ARGS = set_args() + ["--set", "siamese.epochs=3", "--set", "siamese.patience=10", "--seed", "0"]


def _train(*extra, env=None):
    return subprocess.run([sys.executable, "-m", "melanoma_siamese", "train", *extra], capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, timeout=600)


# The reference's sampled triplets run per-sample transforms in 2 persistent DataLoader workers.
SAMPLED = ["--set", "siamese.mining=sampled", "--set", "siamese.loss=triplet", "--set", "siamese.ce_weight=0",
           "--set", "runtime.num_workers=2"]


def _diverged(trace_a, trace_b) -> list[str]:
    """Epochs whose traced rows or parameter checksums differ between two runs (where a failure began)."""
    out = []
    for epoch in (1, 2, 3):
        a = json.loads((trace_a / f"rank0_epoch{epoch}.json").read_text())
        b = json.loads((trace_b / f"rank0_epoch{epoch}.json").read_text())
        if a["rows"] != b["rows"] or a["param_sum"] != b["param_sum"]:
            out.append(f"epoch {epoch}: rows equal {a['rows'] == b['rows']}, parameter sums {a['param_sum']} vs "
                       f"{b['param_sum']}")
    return out


# The training module under torch.compile (inductor; on a CPU it needs a C++ compiler): its checkpoints are the
# plain module's, and a resumed compiled run ends where an uninterrupted compiled one does.
COMPILED = pytest.param(["--set", "runtime.compile=true"], id="in-batch-compiled", marks=pytest.mark.skipif(
    shutil.which("g++") is None and shutil.which("c++") is None,
    reason="torch.compile on a CPU needs a C++ compiler (g++), and this machine has none"))


@pytest.mark.slow
@pytest.mark.parametrize("recipe", [pytest.param([], id="in-batch"), pytest.param(SAMPLED,
                                    id="sampled-triplets-with-workers"), COMPILED])
def test_sigkill_mid_epoch_then_resume_is_bit_exact(tiny_data, tmp_path, recipe):
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    trace_a, trace_b = tmp_path / "trace_straight", tmp_path / "trace_broken"
    assert _train("--data", str(tiny_data), "--out", str(straight), *ARGS, *recipe,
                  env={"MELANOMA_SIAMESE_TRACE": str(trace_a)}).returncode == 0
    killed = _train("--data", str(tiny_data), "--out", str(broken), *ARGS, *recipe,
                    env={"MELANOMA_SIAMESE_FAULT_AT": "2:2", "MELANOMA_SIAMESE_TRACE": str(trace_b)})
    assert killed.returncode == -signal.SIGKILL
    assert load_training_state(broken / "state" / "siamese_last.pth")["epoch"] == 1
    resumed = _train("--resume", str(broken), env={"MELANOMA_SIAMESE_TRACE": str(trace_b)})
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed after epoch 1" in resumed.stdout
    assert _diverged(trace_a, trace_b) == []
    a = load_training_state(straight / "state" / "siamese_last.pth")
    b = load_training_state(broken / "state" / "siamese_last.pth")
    assert a["epoch"] == b["epoch"] == 3 and a["threads"] == b["threads"] >= 1
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for name in ("siamese.pth", "classifier.pth"):
        sa = torch.load(straight / "models" / name, weights_only=True)["state_dict"]
        sb = torch.load(broken / "models" / name, weights_only=True)["state_dict"]
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    ma = json.loads((straight / "metrics.json").read_text())
    mb = json.loads((broken / "metrics.json").read_text())
    assert ma["test"] == mb["test"] and ma["knn"]["test"] == mb["knn"]["test"]


def test_state_holds_every_rng_and_loads_weights_only(tmp_path):
    from melanoma_siamese.checkpoint import atomic_save
    from melanoma_siamese.rng import rng_state, seed_everything, set_rng_state

    seed_everything(3)  # the library's generator becomes its own RandomState, as in training
    state = rng_state()
    atomic_save({"stage": "siamese", "model": {}, "rng": state}, tmp_path / "s.pth")
    loaded = load_training_state(tmp_path / "s.pth")
    import random

    import numpy as np
    from pytorch_metric_learning.utils import common_functions

    expected = (torch.rand(2), np.random.rand(2), random.random(), common_functions.NUMPY_RANDOM.rand())
    set_rng_state(loaded["rng"])
    got = (torch.rand(2), np.random.rand(2), random.random(), common_functions.NUMPY_RANDOM.rand())
    assert torch.equal(expected[0], got[0]) and (expected[1] == got[1]).all()
    assert expected[2] == got[2] and expected[3] == got[3]


def test_truncated_state_is_named(tmp_path):
    path = tmp_path / "state.pth"
    path.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(CheckpointError, match=str(path)):
        load_training_state(path)
    with pytest.raises(CheckpointError, match="nothing to resume"):
        load_training_state(tmp_path / "absent.pth")


@pytest.mark.slow
def test_sigterm_stops_at_a_batch_and_says_how_to_resume(tiny_data, tmp_path):
    """SIGTERM during training: exit 143, the last completed epoch kept, resumable."""
    run = tmp_path / "run"
    stopped = _train("--data", str(tiny_data), "--out", str(run), *ARGS,
                     env={"MELANOMA_SIAMESE_FAULT_AT": "2:1:SIGTERM"})
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr
    assert "--resume" in stopped.stderr
    assert load_training_state(run / "state" / "siamese_last.pth")["epoch"] == 1
    assert not (run / "metrics.json").exists()
