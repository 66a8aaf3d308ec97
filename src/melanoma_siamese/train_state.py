"""Stage 1's progress and its end-of-epoch training state, saved and read here alone.

The state file (RunFolder.state("siamese")) holds what `train --resume` needs to continue bit for bit:
the last epoch's weights, optimizer, schedule, scaler, every random stream, the history and the
early-stopping record. The best weights are not in it: they live only in models/siamese.pth,
written (atomically) each time the monitored value improves, and read back from there at the end.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from .checkpoint import CheckpointError, atomic_save, load_checkpoint, load_training_state, save_model, strip_prefixes
from .rng import rng_state, set_rng_state
from .runfolder import RunFolder


@dataclass
class Progress:
    """Where training stands: the history, images seen, and the early-stopping record."""
    history: list[dict] = field(default_factory=list)
    images_seen: int = 0
    epoch: int = 0
    done: bool = False
    best_value: Optional[float] = None
    best_epoch: int = 0
    waited: int = 0
    started: float = 0.0  # time.time() at which training would have started, had it never stopped
    threads: int = 0  # intra-op threads of the run (runtime.fix_threads): a resumed run uses the same

    def improves(self, value: float, lower_is_better: bool) -> bool:
        return self.best_value is None or (value < self.best_value if lower_is_better else value > self.best_value)

    def record(self, epoch: int, value: float, improved: bool) -> None:
        self.epoch = epoch
        if improved:
            self.best_value, self.best_epoch, self.waited = value, epoch, 0
        else:
            self.waited += 1

    @property
    def seconds(self) -> float:
        return self.history[-1].get("seconds", 0.0) if self.history else 0.0


@dataclass
class Trainables:
    """Everything whose state a resumed run must get back."""
    encoder: torch.nn.Module
    objective: object  # objective.Objective (its loss parameters)
    optimizer: torch.optim.Optimizer
    scheduler: Optional[object]
    scaler: object  # runtime.Precision.scaler (a no-op object unless fp16)


def save_state(run: RunFolder, progress: Progress, parts: Trainables) -> None:
    best = {"value": progress.best_value, "epoch": progress.best_epoch, "waited": progress.waited}
    atomic_save({"format": 2, "stage": "siamese", "epoch": progress.epoch, "done": progress.done,
                 "model": parts.encoder.state_dict(), "loss": parts.objective.state_dict(),
                 "optimizer": parts.optimizer.state_dict(),
                 "scheduler": parts.scheduler.state_dict() if parts.scheduler is not None else {},
                 "scaler": parts.scaler.state_dict(), "history": progress.history, "best": best,
                 "images_seen": progress.images_seen, "threads": progress.threads, "rng": rng_state()}, run.state("siamese"))


def read_state(run: RunFolder) -> dict:
    """The saved state as plain data (CheckpointError when absent or unreadable)."""
    return load_training_state(run.state("siamese"))


def restore_state(state: dict, parts: Trainables) -> Progress:
    """Put a saved state back into the parts and every random stream; returns the progress."""
    parts.encoder.load_state_dict(strip_prefixes(state["model"]))
    parts.objective.load_state_dict(state.get("loss") or {})
    try:
        parts.optimizer.load_state_dict(state["optimizer"])
    except ValueError as exc:
        raise CheckpointError(f"the training state's optimizer does not fit this version's optimizer (parameter "
                              f"groups changed): {exc}; start the run afresh") from exc
    if parts.scheduler is not None:
        parts.scheduler.load_state_dict(state["scheduler"])
    if state.get("scaler"):
        parts.scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"])
    best = state["best"]
    return Progress(history=state["history"], images_seen=state["images_seen"], epoch=state["epoch"],
                    done=state.get("done", False), best_value=best["value"], best_epoch=best["epoch"],
                    waited=best["waited"], threads=state.get("threads", 0))


def save_best(run: RunFolder, encoder: torch.nn.Module, progress: Progress, monitor: str) -> None:
    save_model(encoder, run.siamese, epoch=progress.best_epoch, monitor=monitor, value=progress.best_value)


def load_best(run: RunFolder, encoder: torch.nn.Module, progress: Progress) -> None:
    """The best epoch's weights from models/siamese.pth into `encoder` (nothing if no epoch was trained)."""
    if progress.best_epoch == 0:
        return
    data = load_checkpoint(run.siamese)
    if data.get("epoch") != progress.best_epoch:
        raise CheckpointError(f"{run.siamese} holds epoch {data.get('epoch')}, but the training state says the best "
                              f"epoch is {progress.best_epoch}")
    encoder.load_state_dict(strip_prefixes(data["state_dict"]))

