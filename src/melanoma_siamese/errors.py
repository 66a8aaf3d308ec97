"""The errors the commands turn into messages and exit codes. Imports no torch, so `cli` can catch
them without paying torch's import time on light commands."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


class ConfigError(ValueError):
    """A configuration file, option or run folder that cannot be used; the message says what is valid."""


class CheckpointError(RuntimeError):
    """A checkpoint or training state that cannot be read or does not fit."""


class WeightsError(RuntimeError):
    """Backbone weights that cannot be had or do not fit; the message says what to do."""


class Interrupted(Exception):
    """SIGTERM/SIGINT arrived: the epoch was abandoned at a batch boundary."""


class ImageRejected(ValueError):
    """An input that is not a usable image; `status` is the HTTP status `serve` answers it with."""

    def __init__(self, reason: str, status: int = 400):
        super().__init__(reason)
        self.status = status


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the input, with where it is and what was expected."""

    file: str
    message: str
    column: Optional[str] = None
    value: Optional[str] = None
    kind: str = "error"

    def __str__(self) -> str:
        where = self.file
        if self.column is not None:
            where += f", column '{self.column}'"
        if self.value is not None:
            where += f", value '{self.value}'"
        return f"{where}: {self.message}"


class DataError(Exception):
    """Input that cannot be used; carries every problem found."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        lines = [f"  - {p}" for p in problems]
        super().__init__(f"{len(problems)} problem(s) with the input data:\n" + "\n".join(lines))
