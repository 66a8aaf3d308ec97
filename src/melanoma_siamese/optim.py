"""The optimizer of stage 1: the pretrained backbone and the new layers at their own learning rates,
norm and bias parameters kept out of weight decay."""
from __future__ import annotations

import torch
from torch import nn

from .config import SiameseConfig


def _decay_split(params: list[nn.Parameter], everything: bool = False
                 ) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    if everything:
        return list(params), []
    # Decaying a norm layer's scale or a bias towards zero only fights the normalisation it follows;
    # weight decay is meant for the matrices and kernels (as timm's and torchvision's references do).
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    return decay, no_decay


def build_optimizer(s: SiameseConfig, backbone: list[nn.Parameter], new: list[nn.Parameter]
                    ) -> torch.optim.Optimizer:
    """Adam or AdamW over the backbone (lr x backbone_lr_scale) and the new layers (lr), each split into
    decayed and not decayed parameters."""
    groups = []
    for params, lr in ((backbone, s.lr * s.backbone_lr_scale), (new, s.lr)):
        decay, no_decay = _decay_split(params, s.decay_norm_and_bias)
        groups += [{"params": decay, "lr": lr, "weight_decay": s.weight_decay},
                   {"params": no_decay, "lr": lr, "weight_decay": 0.0}]
    cls = torch.optim.AdamW if s.optimizer == "adamw" else torch.optim.Adam
    return cls([g for g in groups if g["params"]], lr=s.lr, weight_decay=s.weight_decay)


def encoder_optimizer(s: SiameseConfig, encoder, extra: list[nn.Parameter]) -> torch.optim.Optimizer:
    """The optimizer for an Encoder (its new_parameters() are the new layers) and any loss parameters."""
    new_ids = {id(p) for p in encoder.new_parameters()}
    backbone = [p for p in encoder.parameters() if id(p) not in new_ids]
    return build_optimizer(s, backbone, list(encoder.new_parameters()) + list(extra))
