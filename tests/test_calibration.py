import json

import numpy as np
import pytest
from scipy.special import expit

from melanoma_siamese import calibration
from melanoma_siamese.errors import ConfigError
from melanoma_siamese.metrics import expected_calibration_error


def _miscalibrated(n=2000, prevalence=0.25, seed=0):
    """True log-odds from a known model, then scores shifted (class weights) and overconfident (x3)."""
    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < prevalence).astype(int)
    true_logodds = rng.normal(np.where(labels == 1, 1.0, -1.0), 1.0)
    raw = expit(3.0 * true_logodds + 1.5)
    return labels, raw


def test_platt_lowers_ece_and_brier_on_held_out_scores():
    labels, raw = _miscalibrated(seed=0)
    cal = calibration.fit(labels, raw, "platt")
    test_labels, test_raw = _miscalibrated(seed=1)
    out = calibration.report(cal, test_labels, test_raw)
    assert out["ece_after"] < out["ece_before"] / 3
    assert out["brier_after"] < out["brier_before"]
    assert out["ece_after"] < 0.03
    assert cal.slope == pytest.approx(1 / 3 * 2, rel=0.25)  # true log-odds are 2 * (score margin) here


def test_temperature_cannot_undo_a_shift_but_platt_can():
    labels, raw = _miscalibrated(seed=0)
    test_labels, test_raw = _miscalibrated(seed=1)
    platt = calibration.report(calibration.fit(labels, raw, "platt"), test_labels, test_raw)
    temperature = calibration.report(calibration.fit(labels, raw, "temperature"), test_labels, test_raw)
    assert platt["ece_after"] < temperature["ece_after"]


def test_none_keeps_the_raw_score():
    labels, raw = _miscalibrated()
    cal = calibration.fit(labels, raw, "none")
    assert np.allclose(calibration.apply(cal, raw), raw)


def test_separable_validation_gives_finite_parameters():
    labels = np.array([0] * 50 + [1] * 50)
    raw = np.concatenate([np.linspace(0.01, 0.4, 50), np.linspace(0.6, 0.99, 50)])
    cal = calibration.fit(labels, raw)
    assert np.isfinite([cal.slope, cal.intercept]).all() and cal.slope > 0


def _brute_force_bayes(likelihood_ratio: np.ndarray, prevalence: float) -> np.ndarray:
    """P(melanoma | x) from the class-conditional density ratio and the prior, term by term."""
    return prevalence * likelihood_ratio / (prevalence * likelihood_ratio + (1 - prevalence))


def test_prior_shift_matches_bayes_rule():
    # Gaussian classes: the density ratio is known exactly, so P(y | x) at any prior is known exactly.
    x = np.linspace(-4, 4, 81)
    ratio = np.exp(-(x - 1) ** 2 / 2) / np.exp(-(x + 1) ** 2 / 2)
    at_30 = _brute_force_bayes(ratio, 0.30)
    for target in (0.01, 0.05, 0.30, 0.70):
        got = calibration.at_prevalence(at_30, 0.30, target)
        assert np.allclose(got, _brute_force_bayes(ratio, target), atol=1e-12)


def test_apply_at_prevalence_equals_shifting_the_calibrated_probability():
    labels, raw = _miscalibrated()
    cal = calibration.fit(labels, raw)
    shifted = calibration.apply(cal, raw, prevalence=0.02)
    assert np.allclose(shifted, calibration.at_prevalence(calibration.apply(cal, raw), cal.prevalence, 0.02))
    assert cal.prevalence == pytest.approx(labels.mean())
    assert shifted.mean() < calibration.apply(cal, raw).mean()


@pytest.mark.parametrize("prevalence", [None, 0.01, 0.05, 0.5, 0.95])
@pytest.mark.parametrize("method", ["platt", "temperature", "none"])
def test_threshold_mapping_keeps_every_decision(method, prevalence):
    labels, raw = _miscalibrated(n=5000, seed=2)
    cal = calibration.fit(labels, raw, method)
    test_raw = np.concatenate([_miscalibrated(n=5000, seed=3)[1], [0.0, 1.0]])
    for raw_threshold in np.concatenate([np.quantile(test_raw, [0.01, 0.3, 0.5, 0.9, 0.999]), test_raw[:50]]):
        shown = calibration.displayed(cal, test_raw, raw_threshold, prevalence)
        assert np.array_equal(shown["melanoma"], test_raw >= raw_threshold)
        assert not np.any((shown["probability"] > shown["threshold"]) & ~shown["melanoma"])
        rounded_p, rounded_t = np.round(shown["probability"], 4), round(shown["threshold"], 4)
        assert not np.any((rounded_p > rounded_t) & ~shown["melanoma"])


def test_json_round_trip():
    labels, raw = _miscalibrated()
    cal = calibration.fit(labels, raw)
    again = calibration.Calibration.from_dict(json.loads(json.dumps(cal.to_dict())))
    assert again == cal
    assert np.array_equal(calibration.apply(again, raw, 0.1), calibration.apply(cal, raw, 0.1))


def test_bad_inputs_are_config_errors():
    labels, raw = _miscalibrated()
    with pytest.raises(ConfigError, match="platt"):
        calibration.fit(labels, raw, "isotonic")
    with pytest.raises(ConfigError, match="both classes"):
        calibration.fit(np.zeros(10), raw[:10])
    cal = calibration.fit(labels, raw)
    with pytest.raises(ConfigError, match="between 0 and 1"):
        calibration.apply(cal, raw, prevalence=1.0)
    with pytest.raises(ConfigError, match="calibration record"):
        calibration.Calibration.from_dict({"method": "platt"})


def test_ece_against_brute_force():
    rng = np.random.default_rng(0)
    labels, probs = rng.integers(0, 2, 300), rng.random(300)
    probs[:3] = [0.0, 1.0, 0.1]
    brute = 0.0
    for b in range(10):
        lo, hi = b / 10, (b + 1) / 10
        inside = (probs >= lo) & ((probs < hi) if b < 9 else (probs <= hi))
        if inside.any():
            brute += inside.mean() * abs(probs[inside].mean() - labels[inside].mean())
    assert expected_calibration_error(labels, probs) == pytest.approx(brute)
    assert expected_calibration_error(labels, labels.astype(float)) == 0.0
