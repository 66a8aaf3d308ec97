"""Stage 1: the Siamese encoder trained with a metric loss (sampled triplets or in-batch mining).

Validation by retrieval (kNN ROC AUC, precision@1, MAP@R) each epoch, early stopping, an atomic
end-of-epoch training state for --resume, and DDP when launched by torchrun.
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import signal
import threading
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from .augment import BatchAugment, async_to
from .checkpoint import atomic_save, save_model
from .config import Config
from .data.images import (CachedImages, EpochBatches, TripletImages, item_seeds, sample_triplets, train_transform,
                          triplet_keys)
from .data.prepare import Prepared
from .data.sampler import BalancedBatchSampler
from .distributed import Dist, all_gather_objects
from .engine import (balanced_class_weights, embed, embedding_loss, sampled_triplet_loss, train_siamese_epoch,
                     warmup_cosine)
from .losses import build_loss, build_miner
from .metrics import knn_probabilities, retrieval_metrics, similarity_stats
from .models import Encoder
from .rng import rng_state, seed_everything, set_rng_state

Log = Callable[[str], None]


def _optimizer(config: Config, encoder: Encoder, extra_params: list) -> torch.optim.Optimizer:
    s = config.siamese
    new = {id(p) for p in encoder.new_parameters()}
    backbone = [p for p in encoder.parameters() if id(p) not in new]
    groups = [{"params": backbone, "lr": s.lr * s.backbone_lr_scale},
              {"params": list(encoder.new_parameters()) + extra_params, "lr": s.lr}]
    cls = torch.optim.AdamW if s.optimizer == "adamw" else torch.optim.Adam
    return cls(groups, lr=s.lr, weight_decay=s.weight_decay)


def validation_reference(prepared: Prepared, limit: int, seed: int) -> np.ndarray:
    rows = prepared.rows("train")
    if limit and len(rows) > limit:
        rows = np.sort(np.random.default_rng(seed).choice(rows, size=limit, replace=False))
    return rows


def label_of_rows(prepared: Prepared) -> dict[int, int]:
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
    row_label = label_of_rows(prepared)
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

    def _upload(self, values: np.ndarray) -> torch.Tensor:
        return async_to(torch.from_numpy(np.ascontiguousarray(values, dtype=np.int64)), self.device)

    def epoch(self, batches: list[np.ndarray], generator: torch.Generator):
        # The epoch's indices go to the device in one asynchronous copy: a copy per batch from pageable
        # memory would wait for the GPU queue to drain every step.
        flat = np.concatenate(batches) if len(batches) else np.zeros(0, dtype=np.int64)
        labels = self.labels[self._upload(flat)]
        positions = self._upload(self.position[flat]) if self.on_device is not None else None
        start = 0
        for idx in batches:
            end = start + len(idx)
            if positions is not None:
                pixels = self.on_device[positions[start:end]]
            else:
                pixels = torch.from_numpy(np.asarray(self.array[self.rows[idx]]))
                if self.device.type == "cuda":
                    pixels = async_to(pixels, self.device)
            images = self.augment(pixels, generator)
            if self.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            yield images, labels[start:end], idx
            start = end


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
        class_weight = balanced_class_weights(train_labels).to(device)
    sampler = BalancedBatchSampler(train_labels, s.batch_size, rt.seed, s.balanced, epoch_images,
                                   d.rank, d.world_size) if mode == "batch" else None
    transform = train_transform(dc.image_size, dc.mean, dc.std, dc.augment)
    cache_batches = None
    if mode == "batch" and rt.batch_augment:
        cache_batches = CacheBatches(prepared, train_rows, train_labels,
                                     BatchAugment(dc.image_size, dc.mean, dc.std, dc.augment), device, rt.gpu_cache,
                                     channels_last)
    loader, epoch_batches = None, EpochBatches()
    if cache_batches is None:  # per-sample transforms in DataLoader workers, kept alive across epochs
        dataset = (TripletImages(prepared.array, transform) if mode == "sampled"
                   else CachedImages(prepared.array, train_rows, train_labels, transform))
        loader = DataLoader(dataset, batch_sampler=epoch_batches, num_workers=rt.num_workers,
                            persistent_workers=rt.num_workers > 0, pin_memory=device.type == "cuda",
                            generator=torch.Generator().manual_seed(rt.seed))
    ref_rows = validation_reference(prepared, s.val_reference_max, rt.seed)
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
            if mode == "sampled":
                rng = np.random.default_rng([rt.seed, epoch])
                triplets = sample_triplets(train_rows, train_labels, epoch_images, s.balanced, rng)
                seeds = item_seeds(rt.seed, epoch, len(triplets))  # by position in the whole epoch
                triplets, seeds = triplets[d.rank::d.world_size], seeds[d.rank::d.world_size]
                keys = triplet_keys(triplets, seeds)
                per = s.batch_size // d.world_size
                epoch_batches.set([keys[i:i + per] for i in range(0, len(keys) - per + 1, per)])
                batches = loader
            elif cache_batches is not None:
                sampler.set_epoch(epoch)
                batches = cache_batches.epoch(sampler.batches(),
                                              torch.Generator().manual_seed(rt.seed * 100003 + epoch * 131 + d.rank))
            else:
                sampler.set_epoch(epoch)
                positions = sampler.batches()
                seeds = iter(item_seeds(rt.seed, epoch, sum(len(b) for b in positions), stream=1 + d.rank))
                epoch_batches.set([[(int(i), int(next(seeds))) for i in b] for b in positions])
                batches = loader
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
