"""Stage 2: the reference's MLP on the frozen encoder's embeddings (or the stage-1 CE head)."""
from __future__ import annotations

import copy
from typing import Callable

import torch

from .config import Config
from .data.prepare import Prepared
from .engine import embed, evaluate_classifier, train_classifier_epoch
from .objective import balanced_class_weights
from .models import Classifier, Encoder
from .rng import seed_everything

Log = Callable[[str], None]


def train_classifier(config: Config, encoder: Encoder, prepared: Prepared, device: torch.device, log: Log,
                     ) -> tuple[Classifier, list[dict]]:
    c, d = config.classifier, config.data
    seed_everything(config.runtime.seed)
    if c.kind == "head":
        head = Classifier(config.model.embedding_dim, c.dropout, hidden=())
        head.net[0].load_state_dict(encoder.head.state_dict())
        log("[CLS] classifier.kind=head: using the stage-1 cross-entropy head as the classifier")
        return head.eval(), []
    emb = {part: torch.as_tensor(embed(encoder, prepared.array, prepared.rows(part), d.mean, d.std, device,
                                       progress=f"Embedding {part}" if config.runtime.progress else None))
           for part in ("train", "val")}
    labels = {part: torch.as_tensor(prepared.labels(part)) for part in ("train", "val")}
    weight = None
    if c.class_weight == "balanced":
        weight = balanced_class_weights(labels["train"].numpy())
    model = Classifier(config.model.embedding_dim, c.dropout)
    optimizer = torch.optim.Adam(model.parameters(), lr=c.lr, weight_decay=c.weight_decay)
    generator = torch.Generator().manual_seed(config.runtime.seed)
    history, best, best_state, waited = [], None, None, 0
    for epoch in range(1, c.epochs + 1):
        stats = train_classifier_epoch(model, emb["train"], labels["train"], optimizer, c.batch_size, weight, generator)
        val = evaluate_classifier(model, emb["val"], labels["val"], weight)
        improved = best is None or val["val_loss"] < best
        if improved:
            best, best_state, waited = val["val_loss"], copy.deepcopy(model.state_dict()), 0
        else:
            waited += 1
        history.append({"epoch": epoch, **stats, **val, "best": improved})
        log(f"[CLS] Epoch {epoch}/{c.epochs} train_loss={stats['train_loss']:.4f} val_loss={val['val_loss']:.4f} "
            f"train_acc={100 * stats['train_acc']:.2f}% val_acc={100 * val['val_acc']:.2f}%" + (" *" if improved else ""))
        if waited >= c.patience:
            log(f"[CLS] early stop: val_loss has not improved for {c.patience} epochs")
            break
    model.load_state_dict(best_state)
    return model.eval(), history
