"""Callbacks into stage 1's loop, for tests and debugging: fault injection and a per-epoch trace.

The loop only calls what it is given; the command's entry (train.run_train) builds them, from the
environment where a test runs `train` in a subprocess.
"""
from __future__ import annotations

import json
import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

FAULT_ENV = "MELANOMA_SIAMESE_FAULT_AT"
TRACE_ENV = "MELANOMA_SIAMESE_TRACE"


@dataclass(frozen=True)
class EpochEnd:
    """What an epoch-end callback is shown."""
    epoch: int
    rank: int
    world_size: int
    rows: np.ndarray  # the cache rows this rank was given in the epoch
    encoder: torch.nn.Module
    history: Sequence[dict] = ()  # the run's history so far, one record per epoch from the untrained one (0)


@dataclass(frozen=True)
class Hooks:
    on_batch: Optional[Callable[[int, int], None]] = None  # (epoch, batch index), before the batch
    on_epoch_end: Optional[Callable[[EpochEnd], None]] = None  # after validation, before the state is saved

    def batch_hook(self, epoch: int) -> Optional[Callable[[int], None]]:
        return None if self.on_batch is None else (lambda index: self.on_batch(epoch, index))

    def epoch_end(self, report: EpochEnd) -> None:
        if self.on_epoch_end is not None:
            self.on_epoch_end(report)


def fault_at(epoch: int, batch: int, signum: int = signal.SIGKILL) -> Callable[[int, int], None]:
    """A batch callback that sends this process `signum` just before batch `batch` of epoch `epoch`."""
    def hook(at_epoch: int, index: int) -> None:
        if (at_epoch, index) == (epoch, batch):
            os.kill(os.getpid(), signum)
    return hook


def trace_to(folder: Path) -> Callable[[EpochEnd], None]:
    """An epoch-end callback writing the rows this rank trained on and a checksum of its parameters, so a
    test can check DDP shares and synchronisation from outside."""
    def hook(report: EpochEnd) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        with torch.no_grad():
            flat = torch.cat([p.detach().double().flatten().cpu() for p in report.encoder.parameters()])
        (folder / f"rank{report.rank}_epoch{report.epoch}.json").write_text(json.dumps(
            {"rank": report.rank, "world_size": report.world_size, "rows": [int(r) for r in report.rows],
             "param_sum": float(flat.sum()), "param_head": [float(v) for v in flat[:8]]}))
    return hook


def hooks_from_env(environ=os.environ) -> Hooks:
    """MELANOMA_SIAMESE_FAULT_AT=EPOCH:BATCH[:SIGNAL] (default SIGKILL) and MELANOMA_SIAMESE_TRACE=DIR."""
    on_batch = on_epoch_end = None
    spec = environ.get(FAULT_ENV)
    if spec:
        parts = spec.split(":")
        signum = getattr(signal, parts[2]) if len(parts) > 2 else signal.SIGKILL
        on_batch = fault_at(int(parts[0]), int(parts[1]), signum)
    if environ.get(TRACE_ENV):
        on_epoch_end = trace_to(Path(environ[TRACE_ENV]))
    return Hooks(on_batch, on_epoch_end)
