import numpy as np

from melanoma_siamese.data.sampler import BalancedBatchSampler


def test_balanced_batches_every_benign_seen_and_seeded():
    labels = np.array([0] * 90 + [1] * 10)
    sampler = BalancedBatchSampler(labels, batch_size=10, seed=0, epoch_images=180)
    batches = sampler.batches()
    assert len(batches) == 18
    for b in batches:
        assert labels[b].sum() == 5 and len(b) == 10
    seen = np.concatenate(batches)
    assert set(np.flatnonzero(labels == 0)) <= set(seen)  # 90 benign drawn as a permutation: all seen
    again = BalancedBatchSampler(labels, batch_size=10, seed=0, epoch_images=180).batches()
    assert all((x == y).all() for x, y in zip(batches, again))
    sampler.set_epoch(1)
    assert not all((x == y).all() for x, y in zip(batches, sampler.batches()))


def test_ranks_get_disjoint_balanced_shares():
    labels = np.array([0] * 60 + [1] * 12)
    shares = [BalancedBatchSampler(labels, 8, seed=1, rank=r, world_size=2).batches() for r in (0, 1)]
    for a, b in zip(*shares):
        assert len(a) == len(b) == 4 and labels[a].sum() == 2 and labels[b].sum() == 2
    seen = [set(np.concatenate(s)) for s in shares]
    assert not seen[0] & seen[1]  # disjoint over the whole epoch, melanoma cycling included
    assert set(range(60, 72)) <= seen[0] | seen[1]  # every melanoma image seen


def test_unbalanced_mode_is_a_permutation():
    labels = np.array([0] * 30 + [1] * 2)
    batches = BalancedBatchSampler(labels, 8, seed=0, balanced=False).batches()
    assert len(np.unique(np.concatenate(batches))) == 32
