import itertools

import numpy as np
import pytest
import torch

from melanoma_siamese.engine import embed, sampled_triplet_loss, train_siamese_epoch, warmup_cosine
from melanoma_siamese.losses import build_loss, build_miner
from melanoma_siamese.models import Encoder
from melanoma_siamese.stage1 import TrainModule

LOSSES = ["triplet", "contrastive", "multi_similarity", "supcon", "arcface"]
MINERS = ["all", "semihard", "hard", "batch_hard", "multi_similarity"]


def _batches(n_batches=2, size=8, only_one_class=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n_batches):
        labels = torch.zeros(size, dtype=torch.long) if only_one_class else torch.arange(size) % 2
        yield torch.randn(size, 3, 32, 32, generator=g), labels, torch.arange(size)


def _train(loss_name, mining, ce_weight=0.0, batches=None):
    torch.manual_seed(0)
    encoder = Encoder("resnet18", "none", 32, ce_head=ce_weight > 0)
    loss = build_loss(loss_name, 0.2, 32)
    params = list(encoder.parameters()) + (list(loss.parameters()) if loss is not None else [])
    opt = torch.optim.Adam(params, lr=1e-3)
    stats = train_siamese_epoch(TrainModule(encoder, loss), batches if batches is not None else _batches(), "batch", loss,
                                build_miner(mining, 0.2), loss_name, ce_weight, None, opt, None, torch.device("cpu"))
    return encoder, stats


@pytest.mark.parametrize("loss_name,mining", [(l, m) for l, m in itertools.product(LOSSES, MINERS)
                                              if not (l == "arcface" and m != "all")])
def test_each_loss_and_miner_trains_without_nan(loss_name, mining):
    encoder, stats = _train(loss_name, mining)
    assert all(torch.isfinite(p).all() for p in encoder.parameters())
    assert np.isfinite(stats["train_loss"]) or stats["empty_batches"] == 2
    assert stats["images"] == 16


def test_ce_head_only_recipe():
    _, stats = _train("none", "none", ce_weight=1.0)
    assert stats["steps"] == 2 and np.isfinite(stats["train_loss"])


def test_batch_without_pairs_or_triplets_is_counted_not_crashing():
    encoder, stats = _train("triplet", "semihard", batches=_batches(only_one_class=True))
    assert stats["empty_batches"] == 2 and stats["mined"] == 0 and stats["steps"] == 0
    assert all(torch.isfinite(p).all() for p in encoder.parameters())


def test_sampled_triplets_cost_three_passes_and_budget_stops():
    torch.manual_seed(0)
    encoder = Encoder("resnet18", "none", 16)
    opt = torch.optim.Adam(encoder.parameters(), 1e-3)
    batches = [tuple(torch.randn(4, 3, 32, 32) for _ in range(3)) for _ in range(5)]
    stats = train_siamese_epoch(TrainModule(encoder, None), batches, "sampled", sampled_triplet_loss(1.0), None,
                                "triplet", 0.0, None,
                                opt, None, torch.device("cpu"), image_budget=24)
    assert stats["images"] == 24 and stats["steps"] == 2


def test_embed_tta_and_order():
    torch.manual_seed(0)
    encoder = Encoder("resnet18", "none", 16)
    array = np.random.default_rng(0).integers(0, 255, (6, 32, 32, 3), dtype=np.uint8)
    rows = np.array([4, 1, 3])
    plain = embed(encoder, array, rows, 0.5, 0.5, torch.device("cpu"), batch_size=2)
    single = embed(encoder, array, np.array([3]), 0.5, 0.5, torch.device("cpu"))
    assert np.allclose(plain[2], single[0], atol=1e-5)
    tta = embed(encoder, array, rows, 0.5, 0.5, torch.device("cpu"), tta=True)
    assert np.allclose(np.linalg.norm(tta, axis=1), 1, atol=1e-5) and not np.allclose(tta, plain)


def test_warmup_cosine_shape():
    f = warmup_cosine(100, 10)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0) and f(100) == pytest.approx(0.0, abs=1e-9)
