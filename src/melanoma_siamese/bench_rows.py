"""The bench's table rows and its progress log, shared by the training and the serving measurements."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Optional


@dataclass
class Row:
    """One line of the table: ours against a baseline, their ratio and the target it is held to."""
    name: str
    ours: float
    baseline: Optional[float]
    unit: str
    ratio: Optional[float]
    target: str
    passed: Optional[bool]  # None: reported, not held to a target
    note: str = ""


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)
