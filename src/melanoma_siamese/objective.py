"""What stage 1 minimises: metric loss + miner + class-weighted cross-entropy head, one object used by
training and validation alike (so `siamese_loss.png` plots one objective on both curves)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .losses import build_loss, build_miner, count_mined


def balanced_class_weights(labels: np.ndarray) -> torch.Tensor:
    """Inverse-frequency weights for a two-class cross-entropy (n / (2 n_c)), as scikit-learn's 'balanced'."""
    counts = np.bincount(np.asarray(labels), minlength=2).astype(float)
    return torch.tensor(len(labels) / (2 * np.maximum(counts, 1)), dtype=torch.float32)


@dataclass
class Loss:
    """One batch's loss. `value` is None when the batch gives the objective nothing to learn from.

    `logged` is the loss as one process on the whole batch would report it (under DDP the metric part
    is scaled by the world size so that DDP's gradient averaging gives the global batch's gradient)."""
    value: Optional[torch.Tensor]
    logged: Optional[torch.Tensor]
    mined: int


class Objective:
    """The loss of stage 1 on embeddings (and the CE head's logits).

    sampled=True: batches are anchors, positives, negatives stacked (the reference's triplets).
    Otherwise pairs/triplets are mined in-batch; under DDP the miner and loss see the global batch
    (pytorch-metric-learning's distributed wrappers gather every rank's embeddings)."""

    def __init__(self, loss_name: str, metric_loss: Optional[nn.Module], miner: Optional[nn.Module],
                 ce_weight: float = 0.0, class_weight: Optional[torch.Tensor] = None, sampled: bool = False,
                 world_size: int = 1):
        self.loss_name, self.metric_loss, self.miner = loss_name, metric_loss, miner
        self.ce_weight, self.class_weight, self.sampled = ce_weight, class_weight, sampled
        self.world_size = world_size
        self.train_loss, self.train_miner = metric_loss, miner
        if world_size > 1 and not sampled:
            from pytorch_metric_learning.utils.distributed import DistributedLossWrapper, DistributedMinerWrapper

            self.train_loss = DistributedLossWrapper(metric_loss) if metric_loss is not None else None
            self.train_miner = DistributedMinerWrapper(miner) if miner is not None else None

    def parameters(self) -> list[nn.Parameter]:
        return list(self.metric_loss.parameters()) if self.metric_loss is not None else []

    def state_dict(self) -> dict:
        return self.metric_loss.state_dict() if self.metric_loss is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.metric_loss is not None and state:
            self.metric_loss.load_state_dict(state)

    def __call__(self, emb: torch.Tensor, logits: Optional[torch.Tensor], labels: Optional[torch.Tensor],
                 across_ranks: bool = True) -> Loss:
        if self.sampled:
            n = len(emb) // 3
            loss = self.metric_loss(emb[:n], emb[n:2 * n], emb[2 * n:])
            return Loss(loss, loss.detach(), n)
        distributed = across_ranks and self.world_size > 1
        metric, miner = (self.train_loss, self.train_miner) if distributed else (self.metric_loss, self.miner)
        value = logged = None
        mined = len(labels)
        if metric is not None:
            indices = miner(emb, labels) if miner is not None else None
            mined = count_mined(self.loss_name, indices, _global_labels(labels) if distributed else labels)
            # Nothing mined (the rare class absent from the batch, or no pair/triplet violating the margin):
            # the library's loss is then 0 with no gradient, and a step on it would only move the optimizer's
            # moments and schedule. The batch is skipped and counted (`empty_batches`) instead.
            if mined:
                value = metric(emb, labels, indices) if indices is not None else metric(emb, labels)
                logged = value.detach() / (self.world_size if distributed else 1)
        if self.ce_weight > 0:
            ce = self.ce_weight * F.cross_entropy(logits.float(), labels, weight=self.class_weight)
            value = ce if value is None else value + ce
            logged = ce.detach() if logged is None else logged + ce.detach()
        return Loss(value, logged, mined)

    @torch.no_grad()
    def validation_loss(self, emb: torch.Tensor, labels: torch.Tensor, head: Optional[nn.Module], batch_size: int,
                        seed: int, balanced: bool) -> float:
        """The same objective on precomputed embeddings, over fixed seeded batches (or triplets)."""
        from .data.images import sample_triplets
        from .data.sampler import BalancedBatchSampler

        rng = np.random.default_rng(seed)
        y = labels.cpu().numpy()
        if self.sampled:
            trip = torch.as_tensor(sample_triplets(np.arange(len(y)), y, max(len(y), 64), balanced, rng))
            return float(self(emb[trip.T.reshape(-1)], None, None).logged)
        sampler = BalancedBatchSampler(y, batch_size, seed, balanced=balanced and len(np.unique(y)) == 2)
        losses = []
        for idx in sampler:
            e, lab = emb[idx], labels[idx]
            logits = head(e) if head is not None and self.ce_weight > 0 else None
            loss = self(e, logits, lab, across_ranks=False)
            losses.append(float(loss.logged) if loss.logged is not None else 0.0)
        return float(np.mean(losses)) if losses else float("nan")


def _global_labels(labels: torch.Tensor) -> torch.Tensor:
    """Every rank's labels, this rank's first: the order the distributed wrappers gather embeddings in."""
    from pytorch_metric_learning.utils.distributed import all_gather

    return torch.cat([labels, all_gather(labels)])


def sampled_triplet_loss(margin: float) -> nn.Module:
    # The reference: torch's TripletMarginLoss (mean over all triplets) on anchor/positive/negative batches.
    return nn.TripletMarginLoss(margin=margin)


def make_objective(config, train_labels: np.ndarray, device: torch.device, world_size: int = 1) -> Objective:
    """The objective the configuration describes, with class weights from the training part's labels."""
    s = config.siamese
    if s.mining == "sampled":
        return Objective("triplet", sampled_triplet_loss(s.margin).to(device), None, sampled=True,
                         world_size=world_size)
    metric_loss = build_loss(s.loss, s.margin, config.model.embedding_dim)
    if metric_loss is not None:
        metric_loss = metric_loss.to(device)
    class_weight = None
    if s.ce_weight > 0 and s.ce_class_weight:
        class_weight = balanced_class_weights(train_labels).to(device)
    return Objective(s.loss, metric_loss, build_miner(s.mining, s.margin), s.ce_weight, class_weight,
                     world_size=world_size)
