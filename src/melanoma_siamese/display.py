"""How numbers are written for a person: a probability beside its threshold, a distance in the embedding.
Python's strings match the page's (web/index.html) where both show a number."""
from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal


def probability_text(p: float, threshold: float) -> str:
    """A probability printed beside its threshold with the decimals it takes to see which is larger (as the
    page does): 0.2788 above a 0.2788 threshold would read as a bug."""
    for digits in range(4, 9):
        if f"{p:.{digits}f}" != f"{threshold:.{digits}f}" or p == threshold:
            return f"{p:.{digits}f}"
    return f"{p:.8f}" + ("-" if p < threshold else "+")


def distance_text(d: float) -> str:
    """A distance with three significant digits, never in exponent form, rounded half up on the exact value as
    JavaScript's toFixed does (the page's distanceText gives the same string): a tightly trained space puts a
    typical image 0.00002 from its neighbours, and "0.0000" would read as a copy of a training image."""
    decimals = next((n for n in range(4, 8) if d == 0 or abs(d) >= 10 ** (2 - n)), 8)
    return f"{Decimal(float(d)).quantize(Decimal(1).scaleb(-decimals), rounding=ROUND_HALF_UP):f}"
