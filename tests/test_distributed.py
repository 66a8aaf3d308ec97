"""DDP under torchrun: 2 CPU processes with the gloo backend against a single-process run."""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from helpers import set_args

ARGS = set_args() + ["--set", "siamese.epochs=2", "--set", "siamese.batch_size=16", "--seed", "0"]


@pytest.mark.slow
def test_two_process_gloo_run(tiny_data, tmp_path):
    single = tmp_path / "single"
    out = subprocess.run([sys.executable, "-m", "melanoma_siamese", "train", "--data", str(tiny_data), "--out",
                          str(single), "--stage", "siamese", *ARGS], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    ddp, trace = tmp_path / "ddp", tmp_path / "trace"
    env = {**os.environ, "MELANOMA_SIAMESE_TRACE": str(trace), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([_torchrun(), "--standalone", "--nproc_per_node", "2", "-m", "melanoma_siamese", "train",
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


def _torchrun() -> str:
    return shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")


@pytest.mark.slow
def test_two_process_gloo_fold_ensemble(tiny_data, tmp_path):
    """`train --folds 2` under torchrun: both members' stage 1 on both ranks in step, stage 2, out-of-fold
    scores and the ensemble's evaluation on rank 0 alone, in one run folder."""
    from melanoma_siamese.folds import assign_folds

    ddp, trace = tmp_path / "ddp", tmp_path / "trace"
    env = {**os.environ, "MELANOMA_SIAMESE_TRACE": str(trace), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([_torchrun(), "--standalone", "--nproc_per_node", "2", "-m", "melanoma_siamese", "train",
                          "--data", str(tiny_data), "--out", str(ddp), "--folds", "2", *ARGS],
                         capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp", "trace"]
    assert sorted(p.name for p in (ddp / "folds").iterdir()) == ["fold0", "fold1"]
    assert run.stdout.count("[Siamese] Epoch 2/2") == 2  # one line per member: rank 0 alone prints
    assert run.stdout.count("stage 2 and evaluation") == 2
    # The folds are the ones one process assigns (same seed, same training part).
    split = pd.read_csv(ddp / "split.csv", dtype={"isic_id": str, "patient_id": str})
    train = split[split["part"] == "train"].reset_index(drop=True)
    folds = pd.read_csv(ddp / "folds.csv", dtype={"isic_id": str})
    assert list(folds["isic_id"]) == list(train["isic_id"])
    assert list(folds["fold"]) == list(assign_folds(train, 2, 0, "split.csv"))
    # The last member's epochs: disjoint shares of its training part, identical weights on both ranks.
    member = pd.read_csv(ddp / "folds" / "fold1" / "split.csv", dtype={"isic_id": str})
    for epoch in (1, 2):
        r0 = json.loads((trace / f"rank0_epoch{epoch}.json").read_text())
        r1 = json.loads((trace / f"rank1_epoch{epoch}.json").read_text())
        assert not set(r0["rows"]) & set(r1["rows"]) and len(r0["rows"]) == len(r1["rows"])
        assert set(r0["rows"]) | set(r1["rows"]) <= set(member.index[member["part"] == "train"])
        assert r0["param_sum"] == r1["param_sum"] and r0["param_head"] == r1["param_head"]
    for fold in ("fold0", "fold1"):
        assert json.loads((ddp / "folds" / fold / "run.json").read_text())["world_size"] == 2
    oof = pd.read_csv(ddp / "oof_predictions.csv", dtype={"isic_id": str})
    assert sorted(oof["isic_id"]) == sorted(train["isic_id"])  # every training image scored once
    metrics = json.loads((ddp / "metrics.json").read_text())
    assert metrics["folds"]["k"] == 2 and 0.0 <= metrics["test"]["roc_auc"] <= 1.0


# ----------------------------------------------- mining across ranks: the global batch, not each share

RECIPES = [("multi_similarity", "multi_similarity"), ("triplet", "semihard"), ("contrastive", "all"),
           ("supcon", "all"), ("triplet", "batch_hard")]


def _batch():
    import torch

    g = torch.Generator().manual_seed(0)
    emb = torch.nn.functional.normalize(torch.randn(16, 8, generator=g), dim=1)
    labels = torch.tensor([0, 1, 0, 0, 1, 0, 0, 0, 1, 0, 0, 1, 0, 0, 0, 1])
    return emb, labels


def _objective(loss_name, mining, world_size):
    from melanoma_siamese.losses import build_loss, build_miner
    from melanoma_siamese.objective import Objective

    return Objective(loss_name, build_loss(loss_name, 0.2, 8), build_miner(mining, 0.2), world_size=world_size)


def _loss_and_grad(objective, emb, labels):
    emb = emb.clone().requires_grad_(True)
    loss = objective(emb, None, labels)
    loss.value.backward()
    return float(loss.logged), loss.mined, emb.grad


def _rank(rank, world, port, out):
    import torch
    import torch.distributed as dist

    from datetime import timedelta

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # A collective one rank never joins fails after this long instead of waiting gloo's default 30 minutes.
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=120))
    try:
        emb, labels = _batch()
        share = slice(rank * 8, rank * 8 + 8)  # each rank holds half of the batch, as DDP gives it
        results = [_loss_and_grad(_objective(loss, mining, world), emb[share], labels[share])
                   for loss, mining in RECIPES]
        torch.save(results, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_mine_the_global_batch(tmp_path):
    """The loss on two gloo ranks, each holding half of a batch, equals one process's loss on the whole
    batch, mined pairs/triplets and gradients included (DDP averages the ranks' gradients)."""
    import torch
    import torch.multiprocessing as mp

    # Bounded: once under heavy load (torch 2.2) one rank waited forever after the other had finished.
    ranks = mp.spawn(_rank, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=False)
    deadline = time.monotonic() + 240
    while not ranks.join(timeout=5):
        if time.monotonic() > deadline:
            for process in ranks.processes:
                process.kill()
            pytest.fail("the two gloo ranks did not finish within 240 s: " +
                        ", ".join(f"rank {r} exit code {p.exitcode}" for r, p in enumerate(ranks.processes)))
    emb, labels = _batch()
    whole = [_loss_and_grad(_objective(loss, mining, 1), emb, labels) for loss, mining in RECIPES]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    for i, (loss_name, mining) in enumerate(RECIPES):
        value, mined, grad = whole[i]
        assert mined > 0, (loss_name, mining)
        for rank, results in enumerate(ranks):
            r_value, r_mined, r_grad = results[i]
            assert r_value == pytest.approx(value, rel=1e-5), (loss_name, mining, rank)
            assert r_mined == mined, (loss_name, mining, rank)
            # Each rank's loss is scaled by the world size so that DDP's mean of gradients is the whole batch's.
            assert torch.allclose(r_grad / 2, grad[rank * 8:rank * 8 + 8], atol=1e-6), (loss_name, mining, rank)


def test_a_share_alone_is_not_the_global_batch():
    """Without the wrappers a rank's half batch gives another loss: what the test above guards against."""
    emb, labels = _batch()
    value, _, _ = _loss_and_grad(_objective("multi_similarity", "multi_similarity", 1), emb, labels)
    half, _, _ = _loss_and_grad(_objective("multi_similarity", "multi_similarity", 1), emb[:8], labels[:8])
    assert half != pytest.approx(value, rel=1e-3)
