"""How numbers are written for a person: a probability beside its threshold, a distance in the embedding, and
when two prevalences are far enough apart to say so. Python's strings match the page's (web/index.html) where
both show a number."""
from __future__ import annotations

import math
from decimal import ROUND_HALF_UP, Decimal


def probability_text(p: float, threshold: float) -> str:
    """A probability printed beside its threshold with the decimals it takes to see which is larger (as the
    page does): 0.2788 above a 0.2788 threshold would read as a bug."""
    return probability_pair(p, threshold)[0]


def probability_pair(p: float, threshold: float) -> tuple[str, str]:
    """The probability and its threshold at the same decimals, as many as it takes to see which is larger (at
    least 4): 0.27881 beside a threshold printed 0.2788 would read as above it while it is below 0.278834."""
    for digits in range(4, 9):
        if f"{p:.{digits}f}" != f"{threshold:.{digits}f}" or p == threshold:
            return f"{p:.{digits}f}", f"{threshold:.{digits}f}"
    return f"{p:.8f}" + ("-" if p < threshold else "+"), f"{threshold:.8f}"


def distance_text(d: float) -> str:
    """A distance with three significant digits, never in exponent form, rounded half up on the exact value as
    JavaScript's toFixed does (the page's distanceText gives the same string): a tightly trained space puts a
    typical image 0.00002 from its neighbours, and "0.0000" would read as a copy of a training image."""
    decimals = next((n for n in range(4, 8) if d == 0 or abs(d) >= 10 ** (2 - n)), 8)
    return f"{Decimal(float(d)).quantize(Decimal(1).scaleb(-decimals), rounding=ROUND_HALF_UP):f}"


def prevalences_differ(a: float, b: float) -> bool:
    """Whether probabilities at prevalence `a` and at `b` are on scales a reader must be told apart: their odds
    differ by more than 1.28x (log-odds 0.25). The training and validation parts' shares of one split, 24.6% and
    24.4%, do not; 2% against 24.5% does. evaluate, the model card and reliability.png all use this one rule."""
    return abs(_log_odds(a) - _log_odds(b)) > 0.25


def _log_odds(p: float) -> float:
    return math.log(p / (1 - p))
