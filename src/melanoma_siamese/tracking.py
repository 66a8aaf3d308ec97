"""What a run leaves to look back on: train.log, TensorBoard event files, and whether progress bars show.

train.log holds every line the run printed, each prefixed with the local time (ISO 8601, to the second).
With the `track` extra (TensorBoard), RUN/tensorboard/ holds each stage's per-epoch scalars and the test
embedding in the projector, with thumbnails and labels. Imports no torch until a tracker writes.
"""
from __future__ import annotations

import dataclasses
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional, Sequence

import numpy as np

from .errors import ConfigError

if TYPE_CHECKING:
    import pandas as pd
    import torch
    from .hooks import EpochEnd, Hooks

Log = Callable[[str], None]

NOT_SCALARS = ("epoch", "best")
PROJECTOR_MAX_IMAGES = 2000
THUMBNAIL_PX = 32


def now_stamp() -> str:
    return datetime.now().astimezone().isoformat(timespec="seconds")


class TrainLog:
    """A run's `log` callable: prints each line through `echo` and appends it, time-stamped, to `path`.

    Lines are held in memory until `start()` (called once the data is valid and the run's folder is being
    written): a run refused by validation leaves no train.log, and an earlier run's log stays as it was. From
    then on the file is opened per line (and so flushed), so a run that crashes keeps every line it printed,
    and leaving the `with` block on an error adds the error. Each session first writes `=== train SESSION`: a
    "started" run starts the file anew; a "resumed" one (`train --resume`) or a "continued" one (`train --stage
    classifier` on a trained run) appends to it."""

    SESSIONS = ("started", "resumed", "continued")

    def __init__(self, path: Path, echo: Log = print, session: str = "started"):
        if session not in self.SESSIONS:
            raise ValueError(f"TrainLog session {session!r} is not one of {', '.join(self.SESSIONS)}")
        self.path, self.echo, self.session = Path(path), echo, session
        self._held: Optional[list[str]] = [f"{now_stamp()} === train {session}"]

    def start(self) -> None:
        """Write the lines held so far; every later line is written as it comes."""
        if self._held is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("w" if self.session == "started" else "a", encoding="utf-8") as f:
            f.writelines(line + "\n" for line in self._held)
        self._held = None

    def _write(self, lines: list[str]) -> None:
        if self._held is not None:
            self._held.extend(lines)
            return
        with self.path.open("a", encoding="utf-8") as f:
            f.writelines(line + "\n" for line in lines)

    def __call__(self, line: str) -> None:
        self.echo(line)
        stamp = now_stamp()
        self._write([f"{stamp} {part}" for part in (str(line).splitlines() or [""])])

    def __enter__(self) -> "TrainLog":
        return self

    def __exit__(self, kind, exc, tb) -> None:
        if exc is not None and self._held is None:
            self._write([f"{now_stamp()} === stopped by {kind.__name__}: {exc}"])


class _Silent:
    """The log of a rank other than 0: prints and writes nothing."""

    def __call__(self, line: str) -> None:
        pass

    def start(self) -> None:
        pass

    def __enter__(self) -> "_Silent":
        return self

    def __exit__(self, *exc) -> None:
        pass


def session_log(path: Path, echo: Log, stage: str, resume: bool, main: bool):
    """The `log` a `train` session writes through, a context manager: a TrainLog on rank 0 ("resumed" for
    --resume, "started" when stage 1 trains, "continued" for stage 2 alone on a trained run); other ranks print
    and write nothing."""
    if not main:
        return _Silent()
    return TrainLog(path, echo, "resumed" if resume else "started" if stage in ("all", "siamese") else "continued")


def open_tracker(setting: str, folder: Path, purge_from: Optional[int] = None) -> "Tracker":
    """The run's TensorBoard writer as runtime.tensorboard says (auto: when the `track` extra is installed).

    `purge_from`: the first stage-1 epoch this session writes (0 for a fresh run, the resumed epoch + 1 for
    `train --resume`); TensorBoard hides events an earlier session wrote at that step or later. None: keep all
    (a session that does not train stage 1)."""
    writer_class = summary_writer(setting)
    if writer_class is None:
        return Tracker(None)
    return Tracker(writer_class(str(folder), purge_step=purge_from), purge_from or 0)


def summary_writer(setting: str):
    """TensorBoard's SummaryWriter class where runtime.tensorboard asks for it and it is installed, else None;
    a ConfigError when the setting is "on" and TensorBoard is missing (train checks this before writing)."""
    if setting == "off":
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        if setting == "on":
            raise ConfigError(f"runtime.tensorboard=on needs TensorBoard ({exc}); install it with "
                              "pip install 'melanoma-siamese[track]', or set runtime.tensorboard=off") from exc
        return None
    return SummaryWriter


class Tracker:
    """TensorBoard event files of a run (rank 0 only); every method does nothing when `writer` is None."""

    def __init__(self, writer, first_epoch: int = 0):
        self.writer = writer
        self._next_step = {"siamese": first_epoch}

    @property
    def enabled(self) -> bool:
        return self.writer is not None

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def scalars(self, stage: str, history: Sequence[dict]) -> None:
        """Each record's numbers as `stage/name` at step `epoch`, skipping epochs already written."""
        if self.writer is None:
            return
        start = self._next_step.get(stage, 0)
        for record in history:
            step = int(record["epoch"])
            if step < start:
                continue
            for name, value in record.items():
                if name not in NOT_SCALARS and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.writer.add_scalar(f"{stage}/{name}", value, step)
            self._next_step[stage] = start = step + 1
        self.writer.flush()

    def hooks(self, hooks: "Hooks") -> "Hooks":
        """`hooks` with stage 1's scalars written live at the end of every epoch (after any earlier callback)."""
        if self.writer is None:
            return hooks
        earlier = hooks.on_epoch_end

        def on_epoch_end(report: "EpochEnd") -> None:
            if earlier is not None:
                earlier(report)
            self.scalars("siamese", report.history)

        return dataclasses.replace(hooks, on_epoch_end=on_epoch_end)

    def projector(self, array: np.ndarray, seed: int) -> Optional[Callable[["pd.DataFrame", np.ndarray], None]]:
        """`evaluate`'s `on_test` callback that puts the test embedding in the projector; None when not tracking."""
        if self.writer is None:
            return None
        return lambda test, embeddings: self.test_embedding(test, embeddings, array, seed)

    def test_embedding(self, test: "pd.DataFrame", embeddings: np.ndarray, array: np.ndarray, seed: int) -> None:
        """The test part's embedding in the projector, as `evaluate` computed it (at most PROJECTOR_MAX_IMAGES,
        a seeded sample beyond): each point with its thumbnail, label, ids and score (`prob_melanoma`)."""
        if self.writer is None or not len(test):
            return
        import torch

        keep = projector_positions(len(test), PROJECTOR_MAX_IMAGES, seed)
        table = test.iloc[keep]
        rows = table["row"].to_numpy()
        header, metadata = projector_metadata(table)
        self.writer.add_embedding(torch.from_numpy(np.ascontiguousarray(embeddings[keep])), metadata=metadata,
                                  metadata_header=header, label_img=thumbnails(array, rows), global_step=0,
                                  tag="test")
        self.writer.flush()


def projector_positions(n: int, limit: int, seed: int) -> np.ndarray:
    """Every position when there are at most `limit`, else `limit` of them drawn with `seed` (in order)."""
    if n <= limit:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=limit, replace=False))


def projector_metadata(table: "pd.DataFrame") -> tuple[list[str], list[list[str]]]:
    """The projector's columns (label, isic_id, patient_id and, when scored, prob_melanoma) and one row each."""
    header = ["label", "isic_id", "patient_id"]
    columns = [np.where(table["target"].to_numpy() == 1, "melanoma", "benign"), table["isic_id"].astype(str),
               table["patient_id"].astype(str)]
    if "prob_melanoma" in table:
        header.append("prob_melanoma")
        columns.append([f"{p:.4f}" for p in table["prob_melanoma"]])
    return header, [list(values) for values in zip(*(list(c) for c in columns))]


def thumbnails(array: np.ndarray, rows: np.ndarray, size: int = THUMBNAIL_PX, chunk: int = 256) -> "torch.Tensor":
    """N x 3 x size x size floats in [0, 1] from the uint8 cache (antialiased downscaling)."""
    import torch
    import torch.nn.functional as F

    out = []
    for start in range(0, len(rows), chunk):
        pixels = torch.from_numpy(np.asarray(array[rows[start:start + chunk]])).permute(0, 3, 1, 2).float() / 255
        out.append(F.interpolate(pixels, size=(size, size), mode="bilinear", antialias=True).clamp(0, 1))
    return torch.cat(out) if out else torch.zeros((0, 3, size, size))
