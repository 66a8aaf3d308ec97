"""Stage 1: the Siamese encoder trained with a metric loss (sampled triplets or in-batch mining).

Built from named parts: a batch source (batches.py), the objective (objective.py), the precision and
stop flag (runtime.py), the optimizer (optim.py) and the training state (train_state.py). Validation by
retrieval (kNN ROC AUC, precision@1, MAP@R) each epoch, early stopping, an atomic end-of-epoch state
for --resume, and DDP when launched by torchrun.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .batches import make_batch_source
from .config import Config
from .data.prepare import Prepared
from .distributed import Dist, all_gather_objects
from .engine import TrainStep, embed, train_siamese_epoch, warmup_cosine
from .hooks import EpochEnd, Hooks
from .metrics import knn_probabilities, retrieval_metrics, similarity_stats
from .models import Encoder
from .objective import Objective, make_objective
from .optim import encoder_optimizer
from .rng import seed_everything
from .runfolder import RunFolder
from .runtime import StopFlag, fix_threads, precision_for, set_backend_flags, stop_on_signals
from .train_state import Progress, Trainables, load_best, restore_state, save_best, save_state

Log = Callable[[str], None]


def validation_reference(prepared: Prepared, limit: int, seed: int) -> np.ndarray:
    rows = prepared.rows("train")
    if limit and len(rows) > limit:
        rows = np.sort(np.random.default_rng(seed).choice(rows, size=limit, replace=False))
    return rows


def label_of_rows(prepared: Prepared) -> dict[int, int]:
    return dict(zip(prepared.table["row"], prepared.table["target"]))


def _sharded_embed(encoder: Encoder, prepared: Prepared, rows: np.ndarray, config: Config, d: Dist) -> np.ndarray:
    """Each rank embeds every world_size-th row; the pieces are gathered back in order on every rank."""
    dd = config.data
    mine = embed(encoder, prepared.array, rows[d.rank::d.world_size], dd.mean, dd.std)
    pieces = all_gather_objects(mine, d)
    out = np.zeros((len(rows), mine.shape[1]), dtype=np.float32)
    for rank, piece in enumerate(pieces):
        out[rank::d.world_size] = piece
    return out


def validate_encoder(encoder: Encoder, prepared: Prepared, config: Config, device: torch.device, ref_rows: np.ndarray,
                     objective: Objective, d: Dist = Dist()) -> dict:
    """Validation by what matters: kNN ROC AUC and retrieval on the val part, beside the training objective."""
    row_label = label_of_rows(prepared)
    val_labels = prepared.labels("val")
    ref_labels = np.array([row_label[r] for r in ref_rows])
    val_emb = _sharded_embed(encoder, prepared, prepared.rows("val"), config, d)
    ref_emb = _sharded_embed(encoder, prepared, ref_rows, config, d)
    probs = knn_probabilities(val_emb, ref_emb, ref_labels, config.evaluation.knn_k)
    s = config.siamese
    val_loss = objective.validation_loss(torch.as_tensor(val_emb, device=device),
                                         torch.as_tensor(val_labels, device=device), encoder.head, s.batch_size,
                                         config.runtime.seed, s.balanced)
    out = {"val_loss": val_loss, "knn_auc": float(roc_auc_score(val_labels, probs))}
    out.update(retrieval_metrics(val_emb, val_labels, ref_emb, ref_labels))
    out.update(similarity_stats(val_emb, val_labels))
    return out


class TrainModule(nn.Module):
    """What one training step runs (and DDP wraps): the encoder, its CE head, and any loss parameters."""

    def __init__(self, encoder: Encoder, metric_loss: Optional[nn.Module]):
        super().__init__()
        self.encoder = encoder
        has_params = metric_loss is not None and any(True for _ in metric_loss.parameters())
        self.loss_params = metric_loss if has_params else None

    def forward(self, images: torch.Tensor):
        emb = self.encoder(images)
        return emb, (self.encoder.head(emb) if self.encoder.head is not None else None)


@dataclass(frozen=True)
class Plan:
    """How long stage 1 runs: epochs, optimizer steps per epoch, and the schedule's total steps."""
    max_epochs: int
    steps_per_epoch: int
    total_steps: int


def plan_epochs(config: Config, n_train: int, passes_per_image: int) -> Plan:
    """Epochs and steps, capped by siamese.budget_images (backbone passes; a sampled triplet costs three)."""
    s = config.siamese
    epoch_images = s.epoch_images or n_train
    passes_per_epoch = passes_per_image * epoch_images
    max_epochs = s.epochs
    if s.budget_images:
        max_epochs = min(max_epochs, math.ceil(s.budget_images / passes_per_epoch))
    steps = max(1, epoch_images // s.batch_size)
    total = max_epochs * steps
    if s.budget_images:
        total = min(total, math.ceil(s.budget_images / (passes_per_epoch / steps)))
    return Plan(max_epochs, steps, total)


@dataclass
class Stage1:
    """The assembled parts of one stage-1 run."""
    config: Config
    prepared: Prepared
    run: RunFolder
    d: Dist
    encoder: Encoder
    objective: Objective
    step: TrainStep
    source: object  # a batch source from batches.make_batch_source
    plan: Plan
    ref_rows: np.ndarray

    @property
    def device(self) -> torch.device:
        return self.step.precision.device

    @property
    def trainables(self) -> Trainables:
        return Trainables(self.encoder, self.objective, self.step.optimizer, self.step.scheduler,
                          self.step.precision.scaler)

    def validate(self) -> dict:
        return validate_encoder(self.encoder, self.prepared, self.config, self.device, self.ref_rows, self.objective,
                                self.d)


def _module(encoder: Encoder, objective: Objective, config: Config, device: torch.device, d: Dist) -> nn.Module:
    module: nn.Module = TrainModule(encoder, objective.metric_loss)
    if d.enabled:
        module = DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)
    if config.runtime.compile:
        module = torch.compile(module)
    return module


def build_stage1(config: Config, prepared: Prepared, device: torch.device, run: RunFolder, d: Dist = Dist()
                 ) -> Stage1:
    """Every part, in the order that draws the seeded random streams as every earlier version did."""
    s, rt = config.siamese, config.runtime
    seed_everything(rt.seed)
    set_backend_flags(device)
    precision = precision_for(rt, device)
    encoder = precision.layout(Encoder(config.model.backbone, config.model.pretrained, config.model.embedding_dim,
                                       ce_head=s.ce_weight > 0).to(device))
    train_rows, train_labels = prepared.rows("train"), prepared.labels("train")
    objective = make_objective(config, train_labels, device, d.world_size)
    optimizer = encoder_optimizer(s, encoder, objective.parameters())
    source = make_batch_source(config, prepared.array, train_rows, train_labels, device, d, precision.channels_last)
    plan = plan_epochs(config, len(train_rows), source.passes_per_image)
    scheduler = None
    if s.scheduler == "cosine":
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, warmup_cosine(plan.total_steps, int(s.warmup_epochs * plan.steps_per_epoch)))
    step = TrainStep(_module(encoder, objective, config, device, d), objective, optimizer, precision, scheduler,
                     d.enabled)
    ref_rows = validation_reference(prepared, s.val_reference_max, rt.seed)
    return Stage1(config, prepared, run, d, encoder, objective, step, source, plan, ref_rows)


def _epoch(st: Stage1, progress: Progress, epoch: int, stop: StopFlag, hooks: Hooks, log: Log) -> None:
    """Train one epoch, validate, keep the best weights, decide whether to stop, save the state."""
    s, d = st.config.siamese, st.d
    budget_left = s.budget_images - progress.images_seen if s.budget_images else None
    title = f"[Siamese] Epoch {epoch}/{st.plan.max_epochs}"
    stats = train_siamese_epoch(st.step, st.source.epoch(epoch),
                                None if budget_left is None else math.ceil(budget_left / d.world_size),
                                hooks.batch_hook(epoch), stop, title if st.config.runtime.progress and d.main else None)
    progress.images_seen += stats["images"] * d.world_size
    val = st.validate()
    improved = progress.improves(val[s.monitor], lower_is_better=s.monitor == "val_loss")
    progress.record(epoch, val[s.monitor], improved)
    if improved and d.main:
        save_best(st.run, st.encoder, progress, s.monitor)
    progress.history.append({"epoch": epoch, **stats, **val, "images_seen": progress.images_seen, "best": improved,
                             "seconds": time.time() - progress.started})
    log(f"{title} train_loss={stats['train_loss']:.4f} val_loss={val['val_loss']:.4f} val_knn_auc={val['knn_auc']:.4f} "
        f"p@1={val['precision_at_1']:.4f} map@r={val['map_at_r']:.4f} mined={stats['mined']} "
        f"empty_batches={stats['empty_batches']}" + (" *" if improved else ""))
    progress.done = _finished(st, progress, epoch, log)
    hooks.epoch_end(EpochEnd(epoch, d.rank, d.world_size, st.source.epoch_rows, st.encoder, progress.history))
    if d.main:
        save_state(st.run, progress, st.trainables)


def _finished(st: Stage1, progress: Progress, epoch: int, log: Log) -> bool:
    s = st.config.siamese
    finished = epoch == st.plan.max_epochs
    if progress.waited >= s.patience:
        log(f"[Siamese] early stop: {s.monitor} has not improved for {s.patience} epochs "
            f"(best epoch {progress.best_epoch})")
        finished = True
    if s.budget_images and progress.images_seen >= s.budget_images:
        log(f"[Siamese] image budget of {s.budget_images} backbone passes spent")
        finished = True
    return finished


def _start(st: Stage1, resume: Optional[dict], log: Log) -> Progress:
    if resume is not None:
        progress = restore_state(resume, st.trainables)
        log(f"[Siamese] resumed after epoch {progress.epoch} from {st.run.state('siamese')}")
        return progress
    first = {"epoch": 0, "images_seen": 0, **st.validate()}
    log(f"[Siamese] untrained encoder: val_knn_auc={first['knn_auc']:.4f} "
        f"precision@1={first['precision_at_1']:.4f}")
    return Progress(history=[first])


def train_siamese(config: Config, prepared: Prepared, device: torch.device, run_dir: Union[Path, RunFolder],
                  log: Log, resume: Optional[dict] = None, d: Dist = Dist(), hooks: Hooks = Hooks()
                  ) -> tuple[Encoder, list[dict]]:
    """Train (or continue, from a state read by train_state.read_state) stage 1; returns the encoder
    with the best epoch's weights (on rank 0) and the history."""
    run = run_dir if isinstance(run_dir, RunFolder) else RunFolder(run_dir)
    threads = fix_threads(resume.get("threads") if resume is not None else None)
    st = build_stage1(config, prepared, device, run, d)
    progress = _start(st, resume, log)
    progress.threads = threads
    progress.started = time.time() - progress.seconds
    with stop_on_signals() as stop:
        for epoch in range(progress.epoch + 1, st.plan.max_epochs + 1):
            if progress.done:
                break
            _epoch(st, progress, epoch, stop, hooks, log)
    if d.main:
        load_best(run, st.encoder, progress)
    return st.encoder, progress.history

