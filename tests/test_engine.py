import itertools

import numpy as np
import pytest
import torch

from melanoma_siamese.engine import TrainStep, embed, train_siamese_epoch, warmup_cosine
from melanoma_siamese.losses import build_loss, build_miner, count_mined
from melanoma_siamese.models import Encoder
from melanoma_siamese.objective import Objective, sampled_triplet_loss
from melanoma_siamese.runtime import Precision
from melanoma_siamese.stage1 import TrainModule

LOSSES = ["triplet", "contrastive", "multi_similarity", "supcon", "arcface"]
MINERS = ["all", "semihard", "hard", "batch_hard", "multi_similarity"]
COMBINATIONS = [(l, m) for l, m in itertools.product(LOSSES, MINERS) if not (l == "arcface" and m != "all")]
PAIR_LOSSES = ("contrastive", "multi_similarity", "supcon")
MARGIN = 0.2


def _batches(n_batches=2, size=8, only_one_class=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n_batches):
        labels = torch.zeros(size, dtype=torch.long) if only_one_class else torch.arange(size) % 2
        yield torch.randn(size, 3, 32, 32, generator=g), labels


def _step(encoder, objective, lr=1e-3):
    params = list(encoder.parameters()) + objective.parameters()
    return TrainStep(TrainModule(encoder, objective.metric_loss), objective, torch.optim.Adam(params, lr=lr),
                     Precision(torch.device("cpu")))


def _train(loss_name, mining, ce_weight=0.0, batches=None):
    torch.manual_seed(0)
    encoder = Encoder("resnet18", "none", 32, ce_head=ce_weight > 0)
    objective = Objective(loss_name, build_loss(loss_name, MARGIN, 32), build_miner(mining, MARGIN), ce_weight)
    before = [p.detach().clone() for p in encoder.parameters()]
    stats = train_siamese_epoch(_step(encoder, objective), batches if batches is not None else _batches())
    changed = any(not torch.equal(a, p) for a, p in zip(before, encoder.parameters()))
    return encoder, stats, changed


@pytest.mark.parametrize("loss_name,mining", COMBINATIONS)
def test_each_loss_and_miner_trains(loss_name, mining):
    encoder, stats, changed = _train(loss_name, mining)
    assert stats["steps"] > 0 and stats["mined"] > 0, stats  # a recipe that skips every batch would not train
    assert changed
    assert all(torch.isfinite(p).all() for p in encoder.parameters())
    assert np.isfinite(stats["train_loss"]) and stats["images"] == 16


def test_ce_head_only_recipe():
    _, stats, changed = _train("none", "none", ce_weight=1.0)
    assert stats["steps"] == 2 and np.isfinite(stats["train_loss"]) and changed


def test_batch_without_pairs_or_triplets_is_counted_not_stepped():
    encoder, stats, changed = _train("triplet", "semihard", batches=_batches(only_one_class=True))
    assert stats["empty_batches"] == 2 and stats["mined"] == 0 and stats["steps"] == 0
    assert not changed  # no step: not even the optimizer's moments moved the weights


def test_sampled_triplets_cost_three_passes_and_budget_stops():
    torch.manual_seed(0)
    encoder = Encoder("resnet18", "none", 16)
    objective = Objective("triplet", sampled_triplet_loss(1.0), None, sampled=True)
    batches = [(torch.randn(12, 3, 32, 32), None) for _ in range(5)]  # 4 anchors, 4 positives, 4 negatives
    stats = train_siamese_epoch(_step(encoder, objective), batches, image_budget=24)
    assert stats["images"] == 24 and stats["steps"] == 2 and stats["mined"] == 8


def test_validation_uses_the_training_objective():
    """Training and validation losses are one objective: the CE head's class weights included."""
    torch.manual_seed(0)
    emb = torch.nn.functional.normalize(torch.randn(16, 8), dim=1)
    labels = torch.tensor([0] * 12 + [1] * 4)
    head = torch.nn.Linear(8, 2)
    weighted = Objective("none", None, None, 1.0, torch.tensor([0.6, 2.0]))
    plain = Objective("none", None, None, 1.0, None)
    ce = torch.nn.functional.cross_entropy(head(emb), labels, weight=torch.tensor([0.6, 2.0]))
    assert float(weighted(emb, head(emb), labels).logged) == pytest.approx(float(ce))
    assert weighted.validation_loss(emb, labels, head, 16, 0, False) == pytest.approx(float(ce))
    assert plain.validation_loss(emb, labels, head, 16, 0, False) != pytest.approx(float(ce))


# ------------------------------------------------------------- count_mined against brute force


def _distance(mining, emb):
    e = emb.tolist()
    n = len(e)
    if mining == "multi_similarity":  # cosine similarity (higher = closer)
        return [[sum(a * b for a, b in zip(e[i], e[j])) for j in range(n)] for i in range(n)]
    return [[sum((a - b) ** 2 for a, b in zip(e[i], e[j])) ** 0.5 for j in range(n)] for i in range(n)]


def _brute_mined(mining, emb, labels):
    """The miner's rule, by loops over the batch: ('pairs', positives, negatives) or ('triplets', list)."""
    y, n = labels.tolist(), len(labels)
    d = _distance(mining, emb)
    pos = [(a, p) for a in range(n) for p in range(n) if a != p and y[a] == y[p]]
    neg = [(a, q) for a in range(n) for q in range(n) if y[a] != y[q]]
    triplets = [(a, p, q) for a, p in pos for q in range(n) if y[q] != y[a]]
    if mining in ("all", "none"):
        return None
    if mining == "semihard":
        return "triplets", [t for t in triplets if 0 < d[t[0]][t[2]] - d[t[0]][t[1]] <= MARGIN]
    if mining == "hard":
        return "triplets", [t for t in triplets if d[t[0]][t[2]] - d[t[0]][t[1]] <= 0]
    if mining == "batch_hard":  # one triplet for each anchor with a positive and a negative
        anchors = {a for a, _, _ in triplets}
        return "triplets", [(a, None, None) for a in anchors]
    # multi-similarity: positives less similar than the most similar negative + eps, and vice versa
    eps = 0.1
    if not pos or not neg:
        return "pairs", [], []
    hard_pos = [(a, p) for a, p in pos if d[a][p] - eps < max([d[a][q] for b, q in neg if b == a], default=-9)]
    hard_neg = [(a, q) for a, q in neg if d[a][q] + eps > min([d[a][p] for b, p in pos if b == a], default=9)]
    return "pairs", hard_pos, hard_neg


def _brute_count(loss_name, mining, emb, labels):
    """What the loss is given, counted from the brute-force mining."""
    y, n = labels.tolist(), len(labels)
    if loss_name in ("arcface", "none"):
        return n
    mined = _brute_mined(mining, emb, labels)
    pairs = loss_name in PAIR_LOSSES
    if mined is None:  # no miner: every pair, or every triplet
        if pairs:
            return sum(1 for a in range(n) for b in range(n) if a != b)
        return sum(1 for a in range(n) for p in range(n) for q in range(n) if a != p and y[a] == y[p] != y[q])
    if mined[0] == "triplets":
        return 2 * len(mined[1]) if pairs else len(mined[1])  # a triplet is one positive and one negative pair
    _, hard_pos, hard_neg = mined
    if pairs:
        return len(hard_pos) + len(hard_neg)
    return sum(1 for a, _ in hard_pos for b, _ in hard_neg if a == b)  # pairs sharing an anchor make triplets


@pytest.mark.parametrize("loss_name,mining", COMBINATIONS + [("none", "none")])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_count_mined_equals_brute_force(loss_name, mining, seed):
    g = torch.Generator().manual_seed(seed)
    emb = torch.nn.functional.normalize(torch.randn(10, 4, generator=g, dtype=torch.float64), dim=1)
    labels = (torch.rand(10, generator=g) < 0.4).long()
    labels[:2] = torch.tensor([0, 1])  # both classes present
    miner = build_miner(mining, MARGIN)
    indices = miner(emb, labels) if miner is not None else None
    assert count_mined(loss_name, indices, labels) == _brute_count(loss_name, mining, emb, labels)


def test_count_mined_is_zero_with_one_class():
    labels = torch.zeros(6, dtype=torch.long)
    emb = torch.nn.functional.normalize(torch.randn(6, 4), dim=1)
    for loss_name, mining in COMBINATIONS:
        if loss_name == "arcface":
            continue
        miner = build_miner(mining, MARGIN)
        indices = miner(emb, labels) if miner is not None else None
        expected = 6 * 5 if loss_name in PAIR_LOSSES and mining == "all" else 0  # positive pairs only
        assert count_mined(loss_name, indices, labels) == expected, (loss_name, mining)


# ----------------------------------------------------------------------------------- the rest


def test_embed_tta_and_order():
    torch.manual_seed(0)
    encoder = Encoder("resnet18", "none", 16)
    array = np.random.default_rng(0).integers(0, 255, (6, 32, 32, 3), dtype=np.uint8)
    rows = np.array([4, 1, 3])
    plain = embed(encoder, array, rows, 0.5, 0.5, batch_size=2)
    single = embed(encoder, array, np.array([3]), 0.5, 0.5)
    assert np.allclose(plain[2], single[0], atol=1e-5)
    tta = embed(encoder, array, rows, 0.5, 0.5, tta=True)
    assert np.allclose(np.linalg.norm(tta, axis=1), 1, atol=1e-5) and not np.allclose(tta, plain)


def test_warmup_cosine_shape():
    f = warmup_cosine(100, 10)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0) and f(100) == pytest.approx(0.0, abs=1e-9)
