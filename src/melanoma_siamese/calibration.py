"""From the classifier's raw melanoma score to a probability a person can read, and a threshold on the same scale.

The raw score is softmax[:, 1] of the classifier's two logits, i.e. sigmoid(z) with the margin
z = logit_1 - logit_0. The classifier is trained with balanced class weights, which moves z by about
log((1 - pi) / pi) (the score is "shifted"), and on few images it is also over- or under-confident.

Method, chosen for that: Platt scaling, a logistic regression on the margin, p = sigmoid(a * z + b)
(Platt 1999, with the smoothed targets of Lin, Lin & Weng 2007 so a separable validation part cannot
drive the fit to infinity). Its slope `a` fixes the confidence and its intercept `b` undoes the shift.
Temperature scaling (b = 0) fixes only the confidence: the class-weight shift stays. Isotonic regression
is a step function on about 200 validation images: many raw scores share one probability, so it is not
strictly monotone and a threshold could not be carried over decision for decision.

The calibrated number is the probability of melanoma at the prevalence `pi` of the images it was fitted
on (the validation part). `at_prevalence` moves it to another prevalence P by Bayes' rule with the
class-conditional densities unchanged (Saerens, Latinne & Decaestecker 2002):
odds_P = odds_pi * [P / (1 - P)] / [pi / (1 - pi)], i.e. z' = z + logit(P) - logit(pi).

Everything here is a strictly increasing map of the raw score (the fitted slope is kept positive), so a
threshold chosen on the raw score maps onto the displayed scale with every decision unchanged.
Imports no torch: serving with the ONNX engine needs none.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np
from scipy.optimize import minimize
from scipy.special import expit, log_expit, logit
from sklearn.metrics import brier_score_loss

from .errors import ConfigError
from .metrics import expected_calibration_error

METHODS = ("platt", "temperature", "none")
# Raw scores are softmax outputs, often float32: 1.0 and 0.0 occur and have no finite logit.
_EPS = 1e-15
# The slope stays at least this: a zero or negative slope would make the map flat or reverse decisions.
_MIN_SLOPE = 1e-3


@dataclass(frozen=True)
class Calibration:
    """p_calibrated = sigmoid(slope * logit(raw) + intercept), calibrated at `prevalence`."""

    method: str
    slope: float
    intercept: float
    prevalence: float
    n: int

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Calibration":
        try:
            cal = cls(method=str(data["method"]), slope=float(data["slope"]), intercept=float(data["intercept"]),
                      prevalence=float(data["prevalence"]), n=int(data["n"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"not a calibration record ({exc}): {data!r}") from None
        _check_method(cal.method)
        _check_prevalence(cal.prevalence, "calibration prevalence")
        return cal


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ConfigError(f"calibration method {method!r} is not one of {', '.join(METHODS)}")


def _check_prevalence(value: float, what: str = "prevalence") -> None:
    if not 0 < value < 1:
        raise ConfigError(f"{what} must be strictly between 0 and 1, got {value!r}")


def margins(scores: np.ndarray) -> np.ndarray:
    """Raw melanoma scores (softmax[:, 1]) -> the logit margin logit_1 - logit_0, in float64."""
    return logit(np.clip(np.asarray(scores, dtype=np.float64), _EPS, 1 - _EPS))


def _platt_targets(labels: np.ndarray) -> np.ndarray:
    n_pos, n_neg = labels.sum(), len(labels) - labels.sum()
    return np.where(labels == 1, (n_pos + 1) / (n_pos + 2), 1 / (n_neg + 2))


def _fit_logistic(z: np.ndarray, targets: np.ndarray, with_intercept: bool) -> tuple[float, float]:
    """Minimise the cross-entropy of sigmoid(a z + b) against soft targets, a >= _MIN_SLOPE (convex)."""
    def loss(params: np.ndarray) -> tuple[float, np.ndarray]:
        a, b = params[0], params[1] if with_intercept else 0.0
        s = a * z + b
        value = -np.sum(targets * log_expit(s) + (1 - targets) * log_expit(-s))
        residual = expit(s) - targets
        grad = np.array([np.sum(residual * z), np.sum(residual)])
        return float(value), grad if with_intercept else grad[:1]

    start = np.array([1.0, 0.0]) if with_intercept else np.array([1.0])
    bounds = [(_MIN_SLOPE, None), (None, None)] if with_intercept else [(_MIN_SLOPE, None)]
    result = minimize(loss, start, jac=True, method="L-BFGS-B", bounds=bounds)
    return float(result.x[0]), float(result.x[1]) if with_intercept else 0.0


def fit(labels: np.ndarray, scores: np.ndarray, method: str = "platt") -> Calibration:
    """Fit on the validation part's labels (1 = melanoma) and raw scores; "none" keeps the raw score."""
    _check_method(method)
    labels = np.asarray(labels).astype(int)
    if len(labels) == 0 or labels.min() == labels.max():
        raise ConfigError("calibration needs validation images of both classes")
    prevalence = float(labels.mean())
    if method == "none":
        return Calibration("none", 1.0, 0.0, prevalence, len(labels))
    z = margins(scores)
    targets = _platt_targets(labels) if method == "platt" else labels.astype(np.float64)
    slope, intercept = _fit_logistic(z, targets, with_intercept=method == "platt")
    return Calibration(method, slope, intercept, prevalence, len(labels))


def _calibrated_margin(cal: Calibration, scores: np.ndarray, prevalence: Optional[float]) -> np.ndarray:
    z = cal.slope * margins(scores) + cal.intercept
    if prevalence is not None:
        _check_prevalence(prevalence)
        z = z + logit(prevalence) - logit(cal.prevalence)
    return z


def apply(cal: Calibration, scores: np.ndarray, prevalence: Optional[float] = None) -> np.ndarray:
    """Raw scores -> probability of melanoma at `prevalence` (None: the calibration's own, the validation part's)."""
    return expit(_calibrated_margin(cal, scores, prevalence))


def at_prevalence(probs: np.ndarray, from_prevalence: float, to_prevalence: float) -> np.ndarray:
    """Prior-shift correction of calibrated probabilities (Saerens et al. 2002), in odds form."""
    _check_prevalence(from_prevalence)
    _check_prevalence(to_prevalence)
    p = np.clip(np.asarray(probs, dtype=np.float64), _EPS, 1 - _EPS)
    odds = p / (1 - p) * (to_prevalence / (1 - to_prevalence)) / (from_prevalence / (1 - from_prevalence))
    return odds / (1 + odds)


def display_threshold(cal: Calibration, raw_threshold: float, prevalence: Optional[float] = None) -> float:
    """The raw-score threshold on the displayed scale: the same strictly increasing map as `apply`."""
    return float(apply(cal, np.array([raw_threshold]), prevalence)[0])


def displayed(cal: Calibration, scores: np.ndarray, raw_threshold: float,
              prevalence: Optional[float] = None) -> dict:
    """What a person is shown: probabilities, the threshold on their scale, and decisions taken on that scale.

    The decision is `probability >= threshold` on the displayed numbers themselves, so a probability above
    the threshold beside "not melanoma" cannot occur; it equals `raw >= raw_threshold` because the map is
    strictly increasing (the tests check every decision). Rounding both numbers for display keeps the order.
    """
    probs = apply(cal, scores, prevalence)
    threshold = display_threshold(cal, raw_threshold, prevalence)
    return {"probability": probs, "threshold": threshold, "melanoma": probs >= threshold,
            "prevalence": cal.prevalence if prevalence is None else float(prevalence)}


def report(cal: Calibration, labels: np.ndarray, scores: np.ndarray, bins: int = 10,
           shown_prevalence: Optional[float] = None) -> dict:
    """Brier score and expected calibration error of the raw and the calibrated scores on one labelled part.

    No prevalence shift: a held-out part of the same split has about the validation part's prevalence.
    ECE: `bins` equal-width bins on [0, 1], |mean score - melanoma fraction| weighted by the bin's share.
    """
    labels = np.asarray(labels).astype(int)
    raw = np.asarray(scores, dtype=np.float64)
    calibrated = apply(cal, raw)
    return {"method": cal.method, "n": int(len(labels)), "melanoma_share": float(labels.mean()), "ece_bins": bins,
            "ece_binning": "equal-width",
            "brier_before": float(brier_score_loss(labels, raw)),
            "brier_after": float(brier_score_loss(labels, calibrated)),
            "ece_before": expected_calibration_error(labels, raw, bins),
            "ece_after": expected_calibration_error(labels, calibrated, bins),
            **_at_shown(cal, labels, raw, bins, shown_prevalence)}


def _at_shown(cal: Calibration, labels: np.ndarray, raw: np.ndarray, bins: int,
              prevalence: Optional[float]) -> dict:
    """Brier and ECE of the probabilities as shown at `prevalence` (evaluate --prevalence): meaningful where the
    part's own share of melanoma is that prevalence, as for external data from the population it names."""
    if prevalence is None:
        return {}
    shown = apply(cal, raw, prevalence)
    return {"shown_prevalence": float(prevalence), "brier_shown": float(brier_score_loss(labels, shown)),
            "ece_shown": expected_calibration_error(labels, shown, bins)}
