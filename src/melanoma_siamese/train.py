"""Both training stages, and the run that ties data, stages and evaluation together."""
from __future__ import annotations

import copy
import json
import math
import platform
import random
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch.utils.data import DataLoader

from . import plots
from .checkpoint import atomic_save, load_model, save_model
from .config import Config, dump_yaml
from .data.images import CachedImages, TripletImages, sample_triplets, to_chw, train_transform
from .data.prepare import Prepared, assign_split, load_and_validate, write_split
from .data.sampler import BalancedBatchSampler
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


def validate_encoder(encoder: Encoder, prepared: Prepared, config: Config, device: torch.device, ref_rows: np.ndarray,
                     loss_parts: tuple) -> dict:
    """Validation by what matters: kNN ROC AUC and retrieval on the val part, beside the loss."""
    d = config.data
    row_label = _label_of_rows(prepared)
    val_rows = prepared.rows("val")
    val_labels = prepared.labels("val")
    ref_labels = np.array([row_label[r] for r in ref_rows])
    val_emb = embed(encoder, prepared.array, val_rows, d.mean, d.std, device)
    ref_emb = embed(encoder, prepared.array, ref_rows, d.mean, d.std, device)
    probs = knn_probabilities(val_emb, ref_emb, ref_labels, config.evaluation.knn_k)
    mode, metric_loss, miner = loss_parts
    val_loss = embedding_loss(torch.as_tensor(val_emb, device=device), torch.as_tensor(val_labels, device=device),
                              mode, metric_loss, miner, encoder.head, config.siamese.ce_weight,
                              config.siamese.batch_size, config.runtime.seed, config.siamese.balanced)
    out = {"val_loss": val_loss, "knn_auc": float(roc_auc_score(val_labels, probs))}
    out.update(retrieval_metrics(val_emb, val_labels, ref_emb, ref_labels))
    out.update(similarity_stats(val_emb, val_labels))
    return out


def train_siamese(config: Config, prepared: Prepared, device: torch.device, run_dir: Path, log: Log) -> tuple[Encoder, list[dict]]:
    s, d, rt = config.siamese, config.data, config.runtime
    seed_everything(rt.seed)
    encoder = Encoder(config.model.backbone, config.model.pretrained, config.model.embedding_dim,
                      ce_head=s.ce_weight > 0).to(device)
    mode = "sampled" if s.mining == "sampled" else "batch"
    metric_loss = sampled_triplet_loss(s.margin) if mode == "sampled" else build_loss(s.loss, s.margin,
                                                                                       config.model.embedding_dim)
    if metric_loss is not None:
        metric_loss = metric_loss.to(device)
    miner = build_miner(s.mining, s.margin) if mode == "batch" else None
    extra = list(metric_loss.parameters()) if metric_loss is not None else []
    optimizer = _optimizer(config, encoder, extra)

    train_rows, train_labels = prepared.rows("train"), prepared.labels("train")
    transform = train_transform(d.image_size, d.mean, d.std, d.augment)
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
    sampler = BalancedBatchSampler(train_labels, s.batch_size, rt.seed, s.balanced, epoch_images) if mode == "batch" else None
    ref_rows = _validation_reference(prepared, s.val_reference_max, rt.seed)
    loss_parts = (mode, metric_loss, miner)

    history = [{"epoch": 0, "images_seen": 0, **validate_encoder(encoder, prepared, config, device, ref_rows, loss_parts)}]
    log(f"[Siamese] untrained encoder: val_knn_auc={history[0]['knn_auc']:.4f} "
        f"precision@1={history[0]['precision_at_1']:.4f}")
    lower_is_better = s.monitor == "val_loss"
    best_value, best_state, best_epoch, waited = None, None, 0, 0
    images_seen, start = 0, time.time()
    for epoch in range(1, max_epochs + 1):
        budget_left = s.budget_images - images_seen if s.budget_images else None
        loader_seed = torch.Generator().manual_seed(rt.seed * 100003 + epoch)
        workers = rt.num_workers
        if mode == "sampled":
            rng = np.random.default_rng([rt.seed, epoch])
            triplets = sample_triplets(train_rows, train_labels, epoch_images, s.balanced, rng)
            loader = DataLoader(TripletImages(prepared.array, triplets, transform), batch_size=s.batch_size,
                                shuffle=False, num_workers=workers, generator=loader_seed,
                                pin_memory=device.type == "cuda", drop_last=True)
        else:
            sampler.set_epoch(epoch)
            loader = DataLoader(CachedImages(prepared.array, train_rows, train_labels, transform),
                                batch_sampler=[[int(i) for i in b] for b in sampler.batches()],
                                num_workers=workers, generator=loader_seed, pin_memory=device.type == "cuda")
        stats = train_siamese_epoch(encoder, loader, mode, metric_loss, miner, s.loss, s.ce_weight, class_weight,
                                    optimizer, scheduler, device, budget_left, rt.progress,
                                    desc=f"[Siamese] Epoch {epoch}/{max_epochs}")
        images_seen += stats["images"]
        val = validate_encoder(encoder, prepared, config, device, ref_rows, loss_parts)
        value = val[s.monitor]
        improved = best_value is None or (value < best_value if lower_is_better else value > best_value)
        if improved:
            best_value, best_epoch, waited = value, epoch, 0
            best_state = copy.deepcopy(encoder.state_dict())
            save_model(encoder, run_dir / "models" / "siamese.pth", epoch=epoch, monitor=s.monitor, value=value)
        else:
            waited += 1
        entry = {"epoch": epoch, **stats, **val, "images_seen": images_seen, "best": improved,
                 "seconds": time.time() - start}
        history.append(entry)
        log(f"[Siamese] Epoch {epoch}/{max_epochs} train_loss={stats['train_loss']:.4f} val_loss={val['val_loss']:.4f} "
            f"val_knn_auc={val['knn_auc']:.4f} p@1={val['precision_at_1']:.4f} map@r={val['map_at_r']:.4f} "
            f"mined={stats['mined']} empty_batches={stats['empty_batches']}" + (" *" if improved else ""))
        if waited >= s.patience:
            log(f"[Siamese] early stop: {s.monitor} has not improved for {s.patience} epochs (best epoch {best_epoch})")
            break
        if s.budget_images and images_seen >= s.budget_images:
            log(f"[Siamese] image budget of {s.budget_images} backbone passes spent")
            break
    if best_state is not None:
        encoder.load_state_dict(best_state)
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


def run_train(config: Config, source: DataSource, run_dir: Path, stage: str = "all", log: Log = print) -> dict:
    """Validate data, split, train the requested stage(s), evaluate; return the metrics."""
    from .evaluate import evaluate_run

    run_dir = Path(run_dir)
    prepared = load_and_validate(source.data, source.metadata, source.images, config.data.image_size,
                                 config.data.skip_bad_images, Path(config.data.cache_dir) if config.data.cache_dir else None,
                                 max(1, config.runtime.num_workers) * 2, config.runtime.progress, log)
    split_file = run_dir / "split.csv"
    if stage == "classifier" and split_file.is_file():
        from .data.prepare import apply_saved_split
        apply_saved_split(prepared, split_file)
    else:
        split_seed = config.data.split_seed if config.data.split_seed is not None else config.runtime.seed
        assign_split(prepared, config.data.val_fraction, config.data.test_fraction, split_seed,
                     config.data.train_melanoma_fraction)
    device = resolve_device(config.runtime.device)
    log(f"Device: {device}")
    (run_dir / "models").mkdir(parents=True, exist_ok=True)
    (run_dir / "images").mkdir(exist_ok=True)
    if len(prepared.skipped):
        prepared.skipped.to_csv(run_dir / "skipped_images.csv", index=False)
        log(f"Skipped {len(prepared.skipped)} bad image(s); their ids and reasons: {run_dir / 'skipped_images.csv'}")
    write_split(prepared, split_file)
    (run_dir / "config.yaml").write_text(dump_yaml(config))
    info = run_info(config, device, source, prepared)
    (run_dir / "run.json").write_text(json.dumps(info, indent=2))
    parts = ", ".join(f"{k} {v['images']} ({v['melanoma']} melanoma)" for k, v in info["parts"].items())
    log(f"Data: {prepared.dataset.layout} layout, {len(prepared.table)} images; split by patient: {parts}")
    input_sample(config, prepared, run_dir / "images" / "input_sample.png")

    baseline = None
    if stage in ("all", "siamese"):
        start = time.time()
        encoder, history = train_siamese(config, prepared, device, run_dir, log)
        write_history(history, run_dir / "history_siamese.jsonl")
        plots.loss_curves(history[1:], run_dir / "images" / "siamese_loss.png", "Stage 1: Siamese encoder")
        plots.validation_metrics(history, ("knn_auc", "precision_at_1", "map_at_r", "same_class_similarity",
                                           "other_class_similarity"), run_dir / "images" / "val_metrics.png")
        baseline = {"untrained_encoder_test_knn_auc": untrained_test_knn_auc(config, prepared, device),
                    "siamese_seconds": time.time() - start,
                    "backbone_image_passes": history[-1]["images_seen"]}
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
