"""One epoch of each stage, embedding extraction and probabilities: explicit inputs, dicts out."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .objective import Loss, Objective
from .preprocess import to_model_input
from .runtime import Precision, StopFlag
from .progress import bar_disable


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
def embed(encoder: nn.Module, array: np.ndarray, rows: np.ndarray, mean: float, std: float, *,
          batch_size: int = 128, tta: bool = False, progress: Optional[str] = None) -> np.ndarray:
    """L2-normalised embeddings of cache rows, computed where the encoder is (no augmentation; TTA averages
    the 8 flips/transposes). `progress`: the progress bar's title (shown on a terminal only),
    or None for no bar."""
    device = next(encoder.parameters()).device
    encoder.eval()
    out = []
    bar = tqdm(range(0, len(rows), batch_size), desc=progress, disable=bar_disable(progress is not None), leave=False)
    for start in bar:
        images = to_model_input(torch.from_numpy(np.asarray(array[rows[start:start + batch_size]])), mean, std,
                                device)
        if tta:
            e = torch.stack([encoder(v) for v in _dihedral(images)]).mean(0)
            e = F.normalize(e, dim=1)
        else:
            e = encoder(images)
        out.append(e.float().cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, 1), dtype=np.float32)


@dataclass
class TrainStep:
    """What one optimisation step needs: the (possibly DDP-wrapped) module returning (embeddings, CE
    logits or None), the objective, the optimizer and its schedule, and the run's precision."""
    model: nn.Module
    objective: Objective
    optimizer: torch.optim.Optimizer
    precision: Precision
    scheduler: Optional[torch.optim.lr_scheduler.LRScheduler] = None
    distributed: bool = False

    def __call__(self, images: torch.Tensor, labels: Optional[torch.Tensor]) -> tuple[Loss, bool]:
        """One step on one batch; returns the loss and whether a step was taken."""
        with self.precision.autocast():
            emb, logits = self.model(images)
            loss = self.objective(emb.float(), logits, labels)
        value = loss.value
        # A finiteness check reads the loss back to the host; on a GPU that stalls every step, so it is
        # only done on the CPU (on a GPU a non-finite loss shows in the epoch's mean).
        if value is None or (value.device.type == "cpu" and not torch.isfinite(value)):
            if not self.distributed:
                return loss, False
            # Under DDP every rank must run backward, or the gradient all-reduce waits forever.
            value = emb.sum() * 0.0
        self.precision.step(value, self.optimizer)
        if self.scheduler is not None:
            self.scheduler.step()
        return loss, loss.value is not None


def train_siamese_epoch(step: TrainStep, batches: Iterable, image_budget: Optional[int] = None,
                        on_batch: Optional[Callable[[int], None]] = None, stop: Optional[StopFlag] = None,
                        progress: Optional[str] = None) -> dict:
    """One pass over `batches` of (images, labels or None); stops once `image_budget` backbone passes
    are spent. `on_batch(index)` runs before each batch; `progress` is a progress bar's title."""
    step.model.train()
    device = step.precision.device
    total, count, images_seen, mined, empty = 0.0, 0, 0, 0, 0
    bar = tqdm(batches, desc=progress, disable=bar_disable(progress is not None), leave=False)
    for index, (images, labels) in enumerate(bar):
        if image_budget is not None and images_seen >= image_budget:
            break
        if on_batch is not None:
            on_batch(index)
        if stop is not None:
            stop.check()
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True) if labels is not None else None
        loss, stepped = step(images, labels)
        images_seen += len(images)
        mined += loss.mined
        if not stepped:
            empty += 1
            if not step.distributed:
                continue
        total = total + (loss.logged if loss.logged is not None else 0.0)  # on the device: no host sync per step
        count += 1
        if progress is not None and count % 20 == 0:
            bar.set_postfix(loss=f"{float(total) / count:.4f}")
    return {"train_loss": float(total) / count if count else float("nan"), "images": images_seen,
            "mined": mined, "empty_batches": empty, "steps": count}


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
