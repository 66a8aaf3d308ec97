"""Metric losses and in-batch miners from pytorch-metric-learning, chosen by (validated) name."""
from __future__ import annotations

from typing import Optional

import torch
from pytorch_metric_learning import losses, miners
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu
from torch import nn


def build_loss(name: str, margin: float, embedding_dim: int) -> Optional[nn.Module]:
    if name == "triplet":
        return losses.TripletMarginLoss(margin=margin)
    if name == "contrastive":
        # Distances of L2-normalised embeddings lie in [0, 2]; negatives are pushed past `margin`.
        return losses.ContrastiveLoss(pos_margin=0.0, neg_margin=margin)
    if name == "multi_similarity":
        return losses.MultiSimilarityLoss(alpha=2.0, beta=50.0, base=0.5)
    if name == "supcon":
        return losses.SupConLoss(temperature=0.1)
    if name == "arcface":
        return losses.ArcFaceLoss(num_classes=2, embedding_size=embedding_dim, margin=28.6, scale=64)
    if name == "none":
        return None
    raise ValueError(f"unknown loss {name!r}")


def build_miner(name: str, margin: float) -> Optional[nn.Module]:
    # Names are validated in config.py: the library maps a misspelt type_of_triplets to "all" silently.
    if name in ("all", "none", "sampled"):
        return None
    if name in ("semihard", "hard"):
        return miners.TripletMarginMiner(margin=margin, type_of_triplets=name)
    if name == "batch_hard":
        return miners.BatchHardMiner()
    if name == "multi_similarity":
        return miners.MultiSimilarityMiner(epsilon=0.1)
    raise ValueError(f"unknown mining {name!r}")


def uses_pairs(loss_name: str) -> bool:
    return loss_name in ("contrastive", "multi_similarity", "supcon")


def count_mined(loss_name: str, indices: Optional[tuple], labels: torch.Tensor) -> int:
    """How many pairs or triplets a batch gives the loss (all of them when no miner is used)."""
    if loss_name in ("arcface", "none"):
        return len(labels)
    if indices is None:
        indices = lmu.get_all_pairs_indices(labels) if uses_pairs(loss_name) else lmu.get_all_triplets_indices(labels)
    if len(indices) == 3:
        if uses_pairs(loss_name):
            indices = lmu.convert_to_pairs(indices, labels)
        else:
            return int(len(indices[0]))
    if len(indices) == 4 and not uses_pairs(loss_name):
        indices = lmu.convert_to_triplets(indices, labels)
        return int(len(indices[0]))
    return int(len(indices[0]) + len(indices[2]))
