import numpy as np
import pytest
from sklearn import metrics as skm

from melanoma_siamese.metrics import (binary_report, bootstrap_ci, choose_threshold, knn_probabilities,
                                      paired_bootstrap_auc, partial_auc_above_sensitivity, retrieval_metrics,
                                      sensitivity_at_specificity)


def _data(n=400, seed=0):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.2).astype(int)
    p = np.clip(0.3 * y + rng.normal(0.4, 0.2, n), 0, 1)
    return y, p, np.arange(n) // 2


def test_binary_report_matches_sklearn():
    y, p, _ = _data()
    r = binary_report(y, p, 0.5)
    pred = (p >= 0.5).astype(int)
    assert r["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert r["roc_auc"] == pytest.approx(skm.roc_auc_score(y, p))
    assert r["sensitivity"] == pytest.approx(skm.recall_score(y, pred))
    assert r["specificity"] == pytest.approx(skm.recall_score(1 - y, 1 - pred))
    assert r["confusion_matrix"] == skm.confusion_matrix(y, pred).tolist()


def test_partial_auc_against_brute_force():
    y, p, _ = _data()
    # Brute force: area between the ROC curve and TPR = 0.8, over the region where TPR >= 0.8.
    fpr, tpr, _ = skm.roc_curve(y, p)
    grid = np.linspace(0, 1, 200001)
    tpr_grid = np.interp(grid, fpr, tpr)
    brute = skm.auc(grid, np.clip(tpr_grid - 0.8, 0, None))  # sklearn: numpy 1.24 has no np.trapezoid
    assert partial_auc_above_sensitivity(y, p, 0.8) == pytest.approx(brute, abs=2e-3)
    assert partial_auc_above_sensitivity(y, y.astype(float), 0.8) == pytest.approx(0.2)


def test_sensitivity_at_specificity_perfect_and_random():
    y = np.array([0, 0, 0, 1, 1])
    assert sensitivity_at_specificity(y, y.astype(float), 0.9) == 1.0


def test_threshold_rules():
    y, p, _ = _data()
    fpr, tpr, thr = skm.roc_curve(y, p)
    assert choose_threshold(y, p, "youden") == pytest.approx(thr[np.argmax(tpr - fpr)])
    t = choose_threshold(y, p, "sensitivity", target_sensitivity=0.9)
    assert ((p >= t)[y == 1]).mean() >= 0.9
    assert choose_threshold(y, p, "fixed", fixed=0.3) == 0.3


def test_bootstrap_contains_estimate_and_narrows():
    y, p, g = _data(200)
    small = bootstrap_ci(y, p, g, 0.5, n_boot=300, seed=0)
    auc = skm.roc_auc_score(y, p)
    assert small["roc_auc_ci"][0] <= auc <= small["roc_auc_ci"][1]
    y2, p2, g2 = _data(3000, seed=1)
    big = bootstrap_ci(y2, p2, g2, 0.5, n_boot=300, seed=0)
    width = lambda r: r["roc_auc_ci"][1] - r["roc_auc_ci"][0]
    assert width(big) < width(small) / 2


def test_bootstrap_rates_match_a_brute_force_resampling():
    """Sensitivity, specificity and balanced accuracy intervals equal sklearn's scores on the same patient
    resamples (the same seed draws the same patients)."""
    y, p, g = _data(120, seed=4)
    got = bootstrap_ci(y, p, g, 0.4, n_boot=60, seed=2)
    rng = np.random.default_rng(2)
    uniq, inverse = np.unique(g, return_inverse=True)
    sens, spec, bacc = [], [], []
    for _ in range(60):
        idx = np.concatenate([np.flatnonzero(inverse == k) for k in rng.integers(0, len(uniq), len(uniq))])
        if y[idx].min() == y[idx].max():
            continue
        pred = (p[idx] >= 0.4).astype(int)
        sens.append(skm.recall_score(y[idx], pred))
        spec.append(skm.recall_score(1 - y[idx], 1 - pred))
        bacc.append(skm.balanced_accuracy_score(y[idx], pred))
    for name, values in (("sensitivity", sens), ("specificity", spec), ("balanced_accuracy", bacc)):
        assert got[f"{name}_ci"] == pytest.approx(list(np.percentile(values, [2.5, 97.5])))
    observed = ((p >= 0.4)[y == 1]).mean()
    assert got["sensitivity_ci"][0] <= observed <= got["sensitivity_ci"][1]


def test_paired_bootstrap_sign():
    y, p, g = _data(300)
    noisy = np.clip(p + np.random.default_rng(3).normal(0, 0.3, len(p)), 0, 1)
    result = paired_bootstrap_auc(y, p, noisy, g, n_boot=200)
    assert result["auc_difference"] > 0 and result["ci"][0] <= result["auc_difference"] <= result["ci"][1]


def test_knn_probabilities_match_brute_force():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(50, 8))
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    labels = rng.integers(0, 2, 50)
    query = ref[:5] + 0.01
    got = knn_probabilities(query, ref, labels, k=7)
    for i, q in enumerate(query):
        sims = ref @ q
        top = np.argsort(-sims)[:7]
        w = (1 + sims[top]) / 2
        assert got[i] == pytest.approx((w * labels[top]).sum() / w.sum(), abs=1e-5)


def test_retrieval_metrics_perfect_separation():
    ref = np.array([[1, 0], [1, 0.01], [0, 1], [0.01, 1]], dtype=np.float32)
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    out = retrieval_metrics(ref[[0, 2]], np.array([0, 1]), ref, np.array([0, 0, 1, 1]))
    assert out["precision_at_1"] == 1.0 and out["map_at_r"] == 1.0


def test_intervals_where_every_resample_agrees_are_not_shown_as_certainty():
    """A sensitivity of 1 gets the Wilson interval of its counts; a ROC AUC of 1 in every resample is marked and
    shown without an interval, not as '1.000 (95% CI 1.000-1.000)'."""
    from melanoma_siamese.metrics import bootstrap_ci, interval_text, wilson_interval

    labels = np.array([1] * 12 + [0] * 30)
    probs = np.where(labels == 1, 0.9, 0.1) + np.linspace(0, 0.05, len(labels))
    patients = np.arange(len(labels))
    ci = bootstrap_ci(labels, probs, patients, 0.5, n_boot=200, seed=0)
    assert ci["sensitivity_ci"] == pytest.approx(wilson_interval(12, 12)) and ci["sensitivity_ci"][0] < 0.8
    assert ci["specificity_ci_method"].startswith("Wilson") and ci["specificity_ci"][1] == 1.0
    assert ci["roc_auc_ci"] == pytest.approx([1.0, 1.0]) and ci["roc_auc_ci_method"].startswith("bootstrap, no width")
    report = {"roc_auc": 1.0, **ci}
    assert interval_text(report, "roc_auc") == " (no interval: every patient resample gave this value)"
    # Marked where it is not the bootstrap interval a heading announces, in full and in a compact table.
    assert interval_text(report, "sensitivity") == f" (95% CI {ci['sensitivity_ci'][0]:.3f}-1.000, Wilson)"
    assert interval_text(report, "sensitivity", 2, "") == f" ({ci['sensitivity_ci'][0]:.2f}-1.00*)"
    # An ordinary case keeps its bootstrap intervals and no method mark.
    noisy = bootstrap_ci(labels, np.random.default_rng(0).random(len(labels)), patients, 0.5, n_boot=200, seed=0)
    assert not any(k.endswith("_ci_method") for k in noisy) and noisy["roc_auc_ci"][0] < noisy["roc_auc_ci"][1]
