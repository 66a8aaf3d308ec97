"""Stage 2: the reference's MLP on the frozen encoder's embeddings (or the stage-1 CE head)."""
from __future__ import annotations

import copy
from typing import Callable

import numpy as np
import pandas as pd
import torch

from .config import Config
from .data.prepare import Prepared
from .engine import embed, evaluate_classifier, train_classifier_epoch
from .features import blank_clinical, extra_features
from .objective import balanced_class_weights
from .models import Classifier, Encoder
from .rng import seed_everything

Log = Callable[[str], None]


def train_classifier(config: Config, encoder: Encoder, prepared: Prepared, log: Log) -> tuple[Classifier, list[dict]]:
    c, d = config.classifier, config.data
    seed_everything(config.runtime.seed)
    if c.kind == "head":
        head = Classifier(config.model.embedding_dim, c.dropout, hidden=())
        head.net[0].load_state_dict(encoder.head.state_dict())
        log("[CLS] classifier.kind=head: using the stage-1 cross-entropy head as the classifier")
        return head.eval(), []
    emb = {part: embed(encoder, prepared.array, prepared.rows(part), d.mean, d.std,
                       progress=f"Embedding {part}" if config.runtime.progress else None)
           for part in ("train", "val")}
    return fit_classifier(config, emb, {part: prepared.part(part) for part in ("train", "val")}, log)


def fit_classifier(config: Config, embeddings: dict[str, np.ndarray], tables: dict[str, pd.DataFrame], log: Log,
                   ) -> tuple[Classifier, list[dict]]:
    """The MLP on the train part's embeddings (and classifier.features), early-stopped on the val part's loss.
    `tables[part]` holds target and, for the extra features, the clinical columns and patient_id; patient
    context is computed within each part, so training never sees another part's images."""
    c = config.classifier
    seed_everything(config.runtime.seed)
    extra = {part: extra_features(c.features, embeddings[part], tables[part]) for part in ("train", "val")}
    labels = {part: torch.tensor(tables[part]["target"].to_numpy(dtype=np.int64)) for part in ("train", "val")}
    val_x = torch.as_tensor(np.concatenate([embeddings["val"], extra["val"]], axis=1), dtype=torch.float32)
    weight = balanced_class_weights(labels["train"].numpy()) if c.class_weight == "balanced" else None
    model = Classifier(config.model.embedding_dim, c.dropout, features=c.features)
    optimizer = torch.optim.Adam(model.parameters(), lr=c.lr, weight_decay=c.weight_decay)
    generator = torch.Generator().manual_seed(config.runtime.seed)
    rng = np.random.default_rng(config.runtime.seed)
    if extra["train"].shape[1]:
        log(f"[CLS] features: {', '.join(c.features)} ({extra['train'].shape[1]} columns after the embedding)")
    history, best, best_state, waited = [], None, None, 0
    for epoch in range(1, c.epochs + 1):
        # Clinical values are blanked afresh each epoch (features.blank_clinical).
        train_x = torch.as_tensor(np.concatenate(
            [embeddings["train"], blank_clinical(extra["train"], c.features, c.feature_dropout, rng)], axis=1),
            dtype=torch.float32)
        stats = train_classifier_epoch(model, train_x, labels["train"], optimizer, c.batch_size, weight, generator)
        val = evaluate_classifier(model, val_x, labels["val"], weight)
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
