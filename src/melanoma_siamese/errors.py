"""The errors the commands turn into messages and exit codes. Imports no torch, so `cli` can catch
them without paying torch's import time on light commands."""
from __future__ import annotations


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
