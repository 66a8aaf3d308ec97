"""Both training stages, and the run that ties data, stages and evaluation together."""
from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import platform
import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from . import plots
from .augment import BatchAugment
from .checkpoint import atomic_save, load_model, load_training_state, rng_state, save_model, set_rng_state
from .config import Config, dump_yaml
from .data.images import CachedImages, TripletImages, sample_triplets, to_chw, train_transform
from .data.prepare import Prepared, apply_saved_split, assign_split, load_and_validate, write_split
from .data.sampler import BalancedBatchSampler
from .distributed import Dist, all_gather_objects, init_from_env, shutdown
from .engine import (embed, embedding_loss, evaluate_classifier, resolve_device, sampled_triplet_loss,
                     train_classifier_epoch, train_siamese_epoch, warmup_cosine)
from .losses import build_loss, build_miner
from .metrics import knn_probabilities, retrieval_metrics, similarity_stats
from .models import Classifier, Encoder

Log = Callable[[str], None]


@dataclass(frozen=True)
class DataSource:
    data: Optional[Path] = None
    metadata: Optional[Path] = None
    images: Optional[Path] = None

    def as_dict(self) -> dict:
        return {k: str(Path(v).resolve()) if v is not None else None for k, v in vars(self).items()}


def seed_everything(seed: int) -> None:
    from pytorch_metric_learning.utils import common_functions

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    # The metric-learning library draws from its own module-level generator; seed it from the run's seed.
    common_functions.NUMPY_RANDOM = np.random.RandomState(seed)


def run_info(config: Config, device: torch.device, source: DataSource, prepared: Prepared) -> dict:
    import pytorch_metric_learning
    import sklearn
    import torchvision

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                                text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    counts = prepared.table.groupby("part")["target"].agg(["count", "sum"])
    return {
        "command": sys.argv,
        "source": source.as_dict(),
        "layout": prepared.dataset.layout,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
        "git_commit": commit,
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "torchvision": torchvision.__version__, "pytorch_metric_learning": pytorch_metric_learning.__version__,
                     "scikit_learn": sklearn.__version__, "numpy": np.__version__},
        "parts": {part: {"images": int(r["count"]), "melanoma": int(r["sum"])} for part, r in counts.iterrows()},
        "skipped_images": int(len(prepared.skipped)),
        "dropped_duplicates": prepared.dataset.dropped_duplicates,
        "conversions": prepared.conversions,
    }


def _optimizer(config: Config, encoder: Encoder, extra_params: list) -> torch.optim.Optimizer:
    s = config.siamese
    new = {id(p) for p in encoder.new_parameters()}
    backbone = [p for p in encoder.parameters() if id(p) not in new]
    groups = [{"params": backbone, "lr": s.lr * s.backbone_lr_scale},
              {"params": list(encoder.new_parameters()) + extra_params, "lr": s.lr}]
    cls = torch.optim.AdamW if s.optimizer == "adamw" else torch.optim.Adam
    return cls(groups, lr=s.lr, weight_decay=s.weight_decay)


def _validation_reference(prepared: Prepared, limit: int, seed: int) -> np.ndarray:
    rows = prepared.rows("train")
    if limit and len(rows) > limit:
        rows = np.sort(np.random.default_rng(seed).choice(rows, size=limit, replace=False))
    return rows


def _label_of_rows(prepared: Prepared) -> dict[int, int]:
    return dict(zip(prepared.table["row"], prepared.table["target"]))


def _sharded_embed(encoder: Encoder, prepared: Prepared, rows: np.ndarray, config: Config, device: torch.device,
                   d: Dist) -> np.ndarray:
    """Each rank embeds every world_size-th row; the pieces are gathered back in order on every rank."""
    dd = config.data
    mine = embed(encoder, prepared.array, rows[d.rank::d.world_size], dd.mean, dd.std, device)
    pieces = all_gather_objects(mine, d)
    out = np.zeros((len(rows), mine.shape[1]), dtype=np.float32)
    for rank, piece in enumerate(pieces):
        out[rank::d.world_size] = piece
    return out


def validate_encoder(encoder: Encoder, prepared: Prepared, config: Config, device: torch.device, ref_rows: np.ndarray,
                     loss_parts: tuple, d: Dist = Dist()) -> dict:
    """Validation by what matters: kNN ROC AUC and retrieval on the val part, beside the loss."""
    row_label = _label_of_rows(prepared)
    val_labels = prepared.labels("val")
    ref_labels = np.array([row_label[r] for r in ref_rows])
    val_emb = _sharded_embed(encoder, prepared, prepared.rows("val"), config, device, d)
    ref_emb = _sharded_embed(encoder, prepared, ref_rows, config, device, d)
    probs = knn_probabilities(val_emb, ref_emb, ref_labels, config.evaluation.knn_k)
    mode, metric_loss, miner = loss_parts
    val_loss = embedding_loss(torch.as_tensor(val_emb, device=device), torch.as_tensor(val_labels, device=device),
                              mode, metric_loss, miner, encoder.head, config.siamese.ce_weight,
                              config.siamese.batch_size, config.runtime.seed, config.siamese.balanced)
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


def precision_settings(runtime, device: torch.device) -> tuple[Optional[torch.dtype], bool, bool]:
    """(autocast dtype or None, use a gradient scaler, channels_last), resolved for the device."""
    amp = runtime.amp
    if amp == "auto":
        amp = "off" if device.type != "cuda" else ("bf16" if torch.cuda.is_bf16_supported() else "fp16")
    dtype = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    channels_last = runtime.channels_last == "on" or (runtime.channels_last == "auto" and device.type == "cuda")
    return dtype, amp == "fp16", channels_last


class CacheBatches:
    """Training batches gathered from the uint8 cache and augmented as tensors on the device.

    Where the training images fit in GPU memory they are copied there once and gathered there;
    otherwise each uint8 batch is gathered on the CPU and sent from pinned memory.
    """

    def __init__(self, prepared: Prepared, rows: np.ndarray, labels: np.ndarray, augment: BatchAugment,
                 device: torch.device, gpu_cache: str, channels_last: bool):
        self.array, self.rows, self.augment, self.device = prepared.array, rows, augment, device
        self.labels = torch.as_tensor(labels).to(device)
        self.channels_last = channels_last
        self.on_device = None
        if device.type == "cuda" and gpu_cache == "auto":
            free, _ = torch.cuda.mem_get_info(device)
            if self.array[0].nbytes * len(rows) < 0.5 * free:
                self.on_device = torch.from_numpy(np.ascontiguousarray(self.array[np.sort(rows)])).to(device)
                self.position = np.searchsorted(np.sort(rows), rows)

    def epoch(self, batches: list[np.ndarray], generator: torch.Generator):
        for idx in batches:
            if self.on_device is not None:
                pixels = self.on_device[torch.as_tensor(self.position[idx], device=self.device)]
            else:
                pixels = torch.from_numpy(np.asarray(self.array[self.rows[idx]]))
                if self.device.type == "cuda":
                    pixels = pixels.pin_memory().to(self.device, non_blocking=True)
            images = self.augment(pixels, generator)
            if self.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            yield images, self.labels[torch.as_tensor(idx, device=self.device)], idx


def _fault_hook(epoch: int) -> Optional[Callable[[int], None]]:
    """Fault injection for the resume tests: MELANOMA_SIAMESE_FAULT_AT=EPOCH:BATCH[:SIGNAL] sends this
    process SIGNAL (default SIGKILL) just before that batch."""
    spec = os.environ.get("MELANOMA_SIAMESE_FAULT_AT")
    if not spec:
        return None
    parts = spec.split(":")
    at_epoch, at_batch = int(parts[0]), int(parts[1])
    signum = getattr(signal, parts[2]) if len(parts) > 2 else signal.SIGKILL
    if at_epoch != epoch:
        return None
    return lambda index: os.kill(os.getpid(), signum) if index == at_batch else None


def _write_trace(folder: Path, d: Dist, epoch: int, sampler: Optional[BalancedBatchSampler],
                 triplets: Optional[np.ndarray], train_rows: np.ndarray, encoder: Encoder) -> None:
    """Debug trace (MELANOMA_SIAMESE_TRACE=DIR): the cache rows this rank was given in the epoch and a
    checksum of its parameters, so a test can check DDP shares and synchronisation from outside."""
    folder.mkdir(parents=True, exist_ok=True)
    if triplets is not None:
        rows = triplets.ravel()
    else:
        rows = train_rows[np.concatenate(sampler.batches())]
    with torch.no_grad():
        flat = torch.cat([p.detach().double().flatten().cpu() for p in encoder.parameters()])
    (folder / f"rank{d.rank}_epoch{epoch}.json").write_text(json.dumps(
        {"rank": d.rank, "world_size": d.world_size, "rows": [int(r) for r in rows],
         "param_sum": float(flat.sum()), "param_head": [float(v) for v in flat[:8]]}))


@contextlib.contextmanager
def stop_on_signals():
    """SIGTERM/SIGINT set a flag the loop checks between batches (the last epoch's checkpoint is kept)."""
    flag: dict = {"signal": None}
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, lambda signum, frame: flag.update(signal=signum))
    try:
        yield flag
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def train_siamese(config: Config, prepared: Prepared, device: torch.device, run_dir: Path, log: Log,
                  resume: Optional[dict] = None, d: Dist = Dist()) -> tuple[Encoder, list[dict]]:
    s, dc, rt = config.siamese, config.data, config.runtime
    seed_everything(rt.seed)
    encoder = Encoder(config.model.backbone, config.model.pretrained, config.model.embedding_dim,
                      ce_head=s.ce_weight > 0).to(device)
    autocast_dtype, use_scaler, channels_last = precision_settings(rt, device)
    if channels_last:
        encoder = encoder.to(memory_format=torch.channels_last)
    mode = "sampled" if s.mining == "sampled" else "batch"
    metric_loss = sampled_triplet_loss(s.margin) if mode == "sampled" else build_loss(s.loss, s.margin,
                                                                                       config.model.embedding_dim)
    if metric_loss is not None:
        metric_loss = metric_loss.to(device)
    miner = build_miner(s.mining, s.margin) if mode == "batch" else None
    extra = list(metric_loss.parameters()) if metric_loss is not None else []
    optimizer = _optimizer(config, encoder, extra)
    scaler = torch.amp.GradScaler(device.type) if use_scaler else None
    module: nn.Module = TrainModule(encoder, metric_loss)
    if d.enabled:
        module = DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)
    if rt.compile:
        module = torch.compile(module)

    train_rows, train_labels = prepared.rows("train"), prepared.labels("train")
    epoch_images = s.epoch_images or len(train_rows)
    passes_per_epoch = 3 * epoch_images if mode == "sampled" else epoch_images
    max_epochs = s.epochs
    if s.budget_images:
        max_epochs = min(max_epochs, math.ceil(s.budget_images / passes_per_epoch))
    steps_per_epoch = max(1, epoch_images // s.batch_size)
    scheduler = None
    if s.scheduler == "cosine":
        total = max_epochs * steps_per_epoch
        if s.budget_images:
            total = min(total, math.ceil(s.budget_images / (passes_per_epoch / steps_per_epoch)))
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, warmup_cosine(total, int(s.warmup_epochs * steps_per_epoch)))
    class_weight = None
    if s.ce_weight > 0 and s.ce_class_weight:
        counts = np.bincount(train_labels, minlength=2).astype(float)
        class_weight = torch.tensor(len(train_labels) / (2 * np.maximum(counts, 1)), dtype=torch.float32, device=device)
    sampler = BalancedBatchSampler(train_labels, s.batch_size, rt.seed, s.balanced, epoch_images,
                                   d.rank, d.world_size) if mode == "batch" else None
    transform = train_transform(dc.image_size, dc.mean, dc.std, dc.augment)
    cache_batches = None
    if mode == "batch" and rt.batch_augment:
        cache_batches = CacheBatches(prepared, train_rows, train_labels,
                                     BatchAugment(dc.image_size, dc.mean, dc.std, dc.augment), device, rt.gpu_cache,
                                     channels_last)
    ref_rows = _validation_reference(prepared, s.val_reference_max, rt.seed)
    loss_parts = (mode, metric_loss, miner)
    state_file = run_dir / "state" / "siamese_last.pth"
    lower_is_better = s.monitor == "val_loss"

    if resume is None:
        history = [{"epoch": 0, "images_seen": 0,
                    **validate_encoder(encoder, prepared, config, device, ref_rows, loss_parts, d)}]
        log(f"[Siamese] untrained encoder: val_knn_auc={history[0]['knn_auc']:.4f} "
            f"precision@1={history[0]['precision_at_1']:.4f}")
        best = {"value": None, "epoch": 0, "waited": 0, "state_dict": None}
        images_seen, first_epoch, elapsed = 0, 1, 0.0
    else:
        encoder.load_state_dict(resume["model"])
        if metric_loss is not None and resume.get("loss"):
            metric_loss.load_state_dict(resume["loss"])
        optimizer.load_state_dict(resume["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(resume["scheduler"])
        if scaler is not None and resume.get("scaler"):
            scaler.load_state_dict(resume["scaler"])
        history, best, images_seen = resume["history"], resume["best"], resume["images_seen"]
        first_epoch, elapsed = resume["epoch"] + 1, history[-1].get("seconds", 0.0)
        set_rng_state(resume["rng"])
        log(f"[Siamese] resumed after epoch {resume['epoch']} from {state_file}")
    finished = resume is not None and resume.get("done", False)
    start = time.time() - elapsed
    with stop_on_signals() as stop:
        for epoch in range(first_epoch, max_epochs + 1):
            if finished:
                break
            budget_left = s.budget_images - images_seen if s.budget_images else None
            loader_seed = torch.Generator().manual_seed(rt.seed * 100003 + epoch)
            if mode == "sampled":
                rng = np.random.default_rng([rt.seed, epoch])
                triplets = sample_triplets(train_rows, train_labels, epoch_images, s.balanced, rng)
                if d.enabled:
                    triplets = triplets[d.rank::d.world_size]
                batches = DataLoader(TripletImages(prepared.array, triplets, transform),
                                     batch_size=s.batch_size // d.world_size, shuffle=False,
                                     num_workers=rt.num_workers, generator=loader_seed,
                                     pin_memory=device.type == "cuda", drop_last=True)
            elif cache_batches is not None:
                sampler.set_epoch(epoch)
                batches = cache_batches.epoch(sampler.batches(),
                                              torch.Generator().manual_seed(rt.seed * 100003 + epoch * 131 + d.rank))
            else:
                sampler.set_epoch(epoch)
                batches = DataLoader(CachedImages(prepared.array, train_rows, train_labels, transform),
                                     batch_sampler=[[int(i) for i in b] for b in sampler.batches()],
                                     num_workers=rt.num_workers, generator=loader_seed,
                                     pin_memory=device.type == "cuda")
            stats = train_siamese_epoch(module, batches, mode, metric_loss, miner, s.loss, s.ce_weight, class_weight,
                                        optimizer, scheduler, device,
                                        None if budget_left is None else math.ceil(budget_left / d.world_size),
                                        rt.progress and d.main, f"[Siamese] Epoch {epoch}/{max_epochs}",
                                        autocast_dtype, scaler, _fault_hook(epoch), stop, d.enabled)
            images_seen += stats["images"] * d.world_size
            val = validate_encoder(encoder, prepared, config, device, ref_rows, loss_parts, d)
            value = val[s.monitor]
            improved = best["value"] is None or (value < best["value"] if lower_is_better else value > best["value"])
            if improved:
                best = {"value": value, "epoch": epoch, "waited": 0,
                        "state_dict": copy.deepcopy(encoder.state_dict())}
                if d.main:
                    save_model(encoder, run_dir / "models" / "siamese.pth", epoch=epoch, monitor=s.monitor,
                               value=value)
            else:
                best["waited"] += 1
            history.append({"epoch": epoch, **stats, **val, "images_seen": images_seen, "best": improved,
                            "seconds": time.time() - start})
            log(f"[Siamese] Epoch {epoch}/{max_epochs} train_loss={stats['train_loss']:.4f} "
                f"val_loss={val['val_loss']:.4f} val_knn_auc={val['knn_auc']:.4f} p@1={val['precision_at_1']:.4f} "
                f"map@r={val['map_at_r']:.4f} mined={stats['mined']} empty_batches={stats['empty_batches']}"
                + (" *" if improved else ""))
            finished = epoch == max_epochs
            if best["waited"] >= s.patience:
                log(f"[Siamese] early stop: {s.monitor} has not improved for {s.patience} epochs "
                    f"(best epoch {best['epoch']})")
                finished = True
            if s.budget_images and images_seen >= s.budget_images:
                log(f"[Siamese] image budget of {s.budget_images} backbone passes spent")
                finished = True
            trace = os.environ.get("MELANOMA_SIAMESE_TRACE")
            if trace:
                _write_trace(Path(trace), d, epoch, sampler, triplets if mode == "sampled" else None, train_rows,
                             encoder)
            if d.main:
                atomic_save({"format": 1, "stage": "siamese", "epoch": epoch, "done": finished,
                             "model": encoder.state_dict(),
                             "loss": metric_loss.state_dict() if metric_loss is not None else {},
                             "optimizer": optimizer.state_dict(),
                             "scheduler": scheduler.state_dict() if scheduler is not None else {},
                             "scaler": scaler.state_dict() if scaler is not None else {},
                             "history": history, "best": best, "images_seen": images_seen, "rng": rng_state()},
                            state_file)
    if best["state_dict"] is not None:
        encoder.load_state_dict(best["state_dict"])
    return encoder, history


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
                                       progress=config.runtime.progress, desc=f"Embedding {part}"))
           for part in ("train", "val")}
    labels = {part: torch.as_tensor(prepared.labels(part)) for part in ("train", "val")}
    weight = None
    if c.class_weight == "balanced":
        counts = np.bincount(labels["train"].numpy(), minlength=2).astype(float)
        weight = torch.tensor(len(labels["train"]) / (2 * np.maximum(counts, 1)), dtype=torch.float32)
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


def untrained_test_knn_auc(config: Config, prepared: Prepared, device: torch.device) -> float:
    """kNN ROC AUC on the test part with a freshly initialised encoder: what training has to beat."""
    seed_everything(config.runtime.seed)
    encoder = Encoder(config.model.backbone, config.model.pretrained, config.model.embedding_dim).to(device)
    d = config.data
    ref_rows = _validation_reference(prepared, config.siamese.val_reference_max, config.runtime.seed)
    row_label = _label_of_rows(prepared)
    ref = embed(encoder, prepared.array, ref_rows, d.mean, d.std, device)
    test = embed(encoder, prepared.array, prepared.rows("test"), d.mean, d.std, device)
    probs = knn_probabilities(test, ref, np.array([row_label[r] for r in ref_rows]), config.evaluation.knn_k)
    return float(roc_auc_score(prepared.labels("test"), probs))


def write_history(history: list[dict], path: Path) -> None:
    path.write_text("".join(json.dumps(h) + "\n" for h in history))


def input_sample(config: Config, prepared: Prepared, path: Path) -> None:
    """An augmented sample exactly as the model sees it (de-normalised for display)."""
    d = config.data
    torch.manual_seed(config.runtime.seed)
    rows = prepared.part("train").groupby("target").head(4)
    transform = train_transform(d.image_size, d.mean, d.std, d.augment)
    images, titles = [], []
    for _, r in rows.iterrows():
        t = transform(to_chw(prepared.array[r["row"]]))
        images.append(((t * d.std + d.mean).clamp(0, 1).permute(1, 2, 0).numpy() * 255).astype(np.uint8))
        titles.append(f"{r['isic_id']}\n{'melanoma' if r['target'] else 'benign'}")
    plots.image_grid(np.stack(images), titles, path, f"Augmented training input ({d.image_size} px)")


def run_train(config: Config, source: DataSource, run_dir: Path, stage: str = "all", log: Log = print,
              resume: bool = False) -> dict:
    """Validate data, split, train the requested stage(s), evaluate; return the metrics.

    Under torchrun every rank validates and splits alike (so the split is the single-process one),
    trains its share of each batch, and only rank 0 writes files, prints and runs stage 2.
    """
    from .evaluate import evaluate_run

    d = init_from_env(config.runtime.device)
    if not d.main:
        log = lambda line: None  # noqa: E731
    run_dir = Path(run_dir)
    prepared = load_and_validate(source.data, source.metadata, source.images, config.data.image_size,
                                 config.data.skip_bad_images, Path(config.data.cache_dir) if config.data.cache_dir else None,
                                 max(1, config.runtime.num_workers) * 2, config.runtime.progress and d.main, log)
    split_file = run_dir / "split.csv"
    state_file = run_dir / "state" / "siamese_last.pth"
    resume_state = load_training_state(state_file) if resume else None
    if (stage == "classifier" or resume) and split_file.is_file():
        apply_saved_split(prepared, split_file)
    else:
        split_seed = config.data.split_seed if config.data.split_seed is not None else config.runtime.seed
        assign_split(prepared, config.data.val_fraction, config.data.test_fraction, split_seed,
                     config.data.train_melanoma_fraction)
    device = resolve_device(config.runtime.device)
    if d.enabled and device.type == "cuda":
        device = torch.device("cuda", d.local_rank)
    log(f"Device: {device}" + (f" (rank 0 of {d.world_size} processes)" if d.enabled else ""))
    if d.main:
        (run_dir / "models").mkdir(parents=True, exist_ok=True)
        (run_dir / "images").mkdir(exist_ok=True)
        if len(prepared.skipped):
            prepared.skipped.to_csv(run_dir / "skipped_images.csv", index=False)
            log(f"Skipped {len(prepared.skipped)} bad image(s); their ids and reasons: "
                f"{run_dir / 'skipped_images.csv'}")
        write_split(prepared, split_file)
        (run_dir / "config.yaml").write_text(dump_yaml(config))
    info = run_info(config, device, source, prepared)
    info["world_size"] = d.world_size
    parts = ", ".join(f"{k} {v['images']} ({v['melanoma']} melanoma)" for k, v in info["parts"].items())
    log(f"Data: {prepared.dataset.layout} layout, {len(prepared.table)} images; split by patient: {parts}")
    if d.main:
        (run_dir / "run.json").write_text(json.dumps(info, indent=2))
        input_sample(config, prepared, run_dir / "images" / "input_sample.png")

    if stage in ("all", "siamese"):
        start = time.time()
        try:
            encoder, history = train_siamese(config, prepared, device, run_dir, log, resume_state, d)
        finally:
            if not d.main:
                shutdown(d)
        if not d.main:
            return {}
        shutdown(d)
        write_history(history, run_dir / "history_siamese.jsonl")
        plots.loss_curves(history[1:], run_dir / "images" / "siamese_loss.png", "Stage 1: Siamese encoder")
        plots.validation_metrics(history, ("knn_auc", "precision_at_1", "map_at_r", "same_class_similarity",
                                           "other_class_similarity"), run_dir / "images" / "val_metrics.png")
        seconds = history[-1].get("seconds", time.time() - start)
        baseline = {"untrained_encoder_test_knn_auc": untrained_test_knn_auc(config, prepared, device),
                    "siamese_seconds": seconds, "backbone_image_passes": history[-1]["images_seen"]}
        (run_dir / "baseline.json").write_text(json.dumps(baseline, indent=2))
        if stage == "siamese":
            return {"baseline": baseline}
    else:
        encoder, _ = load_model(run_dir / "models" / "siamese.pth", "siamese")
        encoder.to(device)
    classifier, cls_history = train_classifier(config, encoder, prepared, device, log)
    save_model(classifier, run_dir / "models" / "classifier.pth", kind_detail=config.classifier.kind)
    write_history(cls_history, run_dir / "history_classifier.jsonl")
    if cls_history:
        plots.loss_curves(cls_history, run_dir / "images" / "classifier_loss.png", "Stage 2: classifier",
                          extra=("val_acc",))
    return evaluate_run(run_dir, config, prepared, device, log)
