"""Whether a progress bar shows: one rule for every bar (decoding, embedding, training, prediction).

Imports nothing of the package, so the lowest modules can use it.
"""
from __future__ import annotations

from typing import Optional


def bar_disable(wanted: bool) -> Optional[bool]:
    """tqdm's `disable` for a bar: True when it is not wanted (runtime.progress false, --no-progress); else None,
    which tqdm reads as "off unless its stream is a terminal", so redirected output gets no bar debris."""
    return None if wanted else True
