"""One epoch of each stage, embedding extraction and probabilities: explicit inputs, dicts out."""
from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Callable, Iterable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .losses import count_mined


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for, but torch sees no CUDA GPU (torch.cuda.is_available() "
                           "is False); use --device cpu or install a CUDA build of torch")
    return torch.device(name)


def balanced_class_weights(labels: np.ndarray) -> torch.Tensor:
    """Inverse-frequency weights for a two-class cross-entropy (n / (2 n_c)), as scikit-learn's 'balanced'."""
    counts = np.bincount(np.asarray(labels), minlength=2).astype(float)
    return torch.tensor(len(labels) / (2 * np.maximum(counts, 1)), dtype=torch.float32)


def warmup_cosine(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """LR multiplier: linear warm-up, then cosine decay to zero at total_steps."""
    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


def _dihedral(images: torch.Tensor) -> list[torch.Tensor]:
    """The 8 flips/transposes of a square batch."""
    out = []
    for t in (images, images.transpose(2, 3)):
        out += [t, t.flip(3), t.flip(2), t.flip(2).flip(3)]
    return out


@torch.no_grad()
def embed(encoder: nn.Module, array: np.ndarray, rows: np.ndarray, mean: float, std: float,
          device: torch.device, batch_size: int = 128, tta: bool = False, progress: bool = False,
          desc: str = "Embedding") -> np.ndarray:
    """L2-normalised embeddings of cache rows (no augmentation; TTA averages the 8 flips/transposes)."""
    encoder.eval()
    out = []
    for start in tqdm(range(0, len(rows), batch_size), desc=desc, disable=not progress, leave=False):
        pixels = torch.from_numpy(np.asarray(array[rows[start:start + batch_size]]))
        images = pixels.permute(0, 3, 1, 2).to(device, non_blocking=True).float().div_(255)
        images = (images - mean) / std
        if tta:
            e = torch.stack([encoder(v) for v in _dihedral(images)]).mean(0)
            e = F.normalize(e, dim=1)
        else:
            e = encoder(images)
        out.append(e.float().cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, 1), dtype=np.float32)


def sampled_triplet_loss(margin: float) -> nn.Module:
    # The reference: torch's TripletMarginLoss (mean over all triplets) on anchor/positive/negative batches.
    return nn.TripletMarginLoss(margin=margin)


from .errors import Interrupted  # noqa: F401  (re-exported)


def train_siamese_epoch(
    model: nn.Module,
    batches: Iterable,
    mode: str,
    metric_loss: Optional[nn.Module],
    miner: Optional[nn.Module],
    loss_name: str,
    ce_weight: float,
    ce_class_weight: Optional[torch.Tensor],
    optimizer: torch.optim.Optimizer,
    scheduler: Optional[torch.optim.lr_scheduler.LRScheduler],
    device: torch.device,
    image_budget: Optional[int] = None,
    progress: bool = False,
    desc: str = "[Siamese] train",
    autocast_dtype: Optional[torch.dtype] = None,
    scaler: Optional[torch.amp.GradScaler] = None,
    on_batch: Optional[Callable[[int], None]] = None,
    stop: Optional[dict] = None,
    distributed: bool = False,
) -> dict:
    """One pass over `batches`; stops early once `image_budget` backbone passes are spent.

    `model(images)` returns (embeddings, CE logits or None). mode 'sampled': batches are (anchor,
    positive, negative) image tensors, three passes per triplet. Otherwise batches are (images, labels,
    rows): each image embedded once, pairs/triplets mined in-batch.
    """
    model.train()
    total, count, images_seen, mined, empty = 0.0, 0, 0, 0, 0
    bar = tqdm(batches, desc=desc, disable=not progress, leave=False)
    autocast = (lambda: torch.autocast(device.type, dtype=autocast_dtype)) if autocast_dtype else nullcontext
    for index, batch in enumerate(bar):
        if image_budget is not None and images_seen >= image_budget:
            break
        if on_batch is not None:
            on_batch(index)
        if stop is not None and stop.get("signal"):
            raise Interrupted(stop["signal"])
        with autocast():
            if mode == "sampled":
                anchor, positive, negative = (t.to(device, non_blocking=True) for t in batch)
                n = len(anchor)
                emb, _ = model(torch.cat([anchor, positive, negative]))
                emb = emb.float()
                loss = metric_loss(emb[:n], emb[n:2 * n], emb[2 * n:])
                images_seen += 3 * n
                mined_now = n
            else:
                images, labels = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
                emb, logits = model(images)
                emb = emb.float()
                images_seen += len(images)
                loss = emb.new_zeros(())
                mined_now = len(labels)
                if metric_loss is not None:
                    indices = miner(emb, labels) if miner is not None else None
                    mined_now = count_mined(loss_name, indices, labels)
                    if mined_now:
                        loss = loss + (metric_loss(emb, labels, indices) if indices is not None
                                       else metric_loss(emb, labels))
                if ce_weight > 0:
                    loss = loss + ce_weight * F.cross_entropy(logits.float(), labels, weight=ce_class_weight)
        mined += mined_now
        # A finiteness check reads the loss back to the host; on a GPU that stalls every step, so it is
        # only done on the CPU (on a GPU a non-finite loss shows in the epoch's mean).
        if not loss.requires_grad or (device.type == "cpu" and not torch.isfinite(loss)):
            # No pair/triplet in this batch (rare class absent or nothing violates the margin): no step.
            empty += 1
            if not distributed:
                continue
            # Under DDP every rank must run backward, or the gradient all-reduce waits forever.
            loss = emb.sum() * 0.0
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        if scheduler is not None:
            scheduler.step()
        total = total + loss.detach()  # kept on the device: no host sync per step
        count += 1
        if progress and count % 20 == 0:
            bar.set_postfix(loss=f"{float(total) / count:.4f}")
    return {"train_loss": float(total) / count if count else float("nan"), "images": images_seen,
            "mined": mined, "empty_batches": empty, "steps": count}


@torch.no_grad()
def embedding_loss(emb: torch.Tensor, labels: torch.Tensor, mode: str, metric_loss: Optional[nn.Module],
                   miner: Optional[nn.Module], encoder_head: Optional[nn.Module], ce_weight: float,
                   batch_size: int, seed: int, balanced: bool) -> float:
    """Validation loss on precomputed embeddings, over fixed seeded batches (or triplets)."""
    from .data.images import sample_triplets
    from .data.sampler import BalancedBatchSampler

    rng = np.random.default_rng(seed)
    y = labels.cpu().numpy()
    if mode == "sampled":
        trip = torch.as_tensor(sample_triplets(np.arange(len(y)), y, max(len(y), 64), balanced, rng))
        return float(metric_loss(emb[trip[:, 0]], emb[trip[:, 1]], emb[trip[:, 2]]))
    sampler = BalancedBatchSampler(y, batch_size, seed, balanced=balanced and len(np.unique(y)) == 2)
    losses = []
    for idx in sampler:
        e, lab = emb[idx], labels[idx]
        loss = e.new_zeros(())
        if metric_loss is not None:
            loss = loss + metric_loss(e, lab, miner(e, lab)) if miner is not None else loss + metric_loss(e, lab)
        if ce_weight > 0 and encoder_head is not None:
            loss = loss + ce_weight * F.cross_entropy(encoder_head(e), lab)
        losses.append(float(loss))
    return float(np.mean(losses)) if losses else float("nan")


def train_classifier_epoch(model: nn.Module, embeddings: torch.Tensor, labels: torch.Tensor,
                           optimizer: torch.optim.Optimizer, batch_size: int, class_weight: Optional[torch.Tensor],
                           generator: torch.Generator) -> dict:
    model.train()
    order = torch.randperm(len(labels), generator=generator)
    total, correct = 0.0, 0
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        logits = model(embeddings[idx])
        loss = F.cross_entropy(logits, labels[idx], weight=class_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += float(loss.detach()) * len(idx)
        correct += int((logits.argmax(1) == labels[idx]).sum())
    return {"train_loss": total / len(labels), "train_acc": correct / len(labels)}


@torch.no_grad()
def evaluate_classifier(model: nn.Module, embeddings: torch.Tensor, labels: torch.Tensor,
                        class_weight: Optional[torch.Tensor]) -> dict:
    model.eval()
    logits = model(embeddings)
    return {"val_loss": float(F.cross_entropy(logits, labels, weight=class_weight)),
            "val_acc": float((logits.argmax(1) == labels).float().mean())}


@torch.no_grad()
def melanoma_probability(classifier: nn.Module, embeddings: np.ndarray) -> np.ndarray:
    classifier.eval()
    logits = classifier(torch.as_tensor(embeddings, dtype=torch.float32))
    return torch.softmax(logits, dim=1)[:, 1].numpy()
