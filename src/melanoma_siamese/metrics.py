"""Numbers from labels, probabilities and embeddings. No models, no files.

torch is imported inside the functions that use it, so calibration and the light commands can use
the rest without paying torch's import time.
"""
from __future__ import annotations

import numpy as np
from sklearn import metrics as skm


def binary_report(labels: np.ndarray, probs: np.ndarray, threshold: float) -> dict:
    """Everything the field reports for one set of predictions at one threshold."""
    labels = np.asarray(labels).astype(int)
    probs = np.asarray(probs, dtype=float)
    pred = (probs >= threshold).astype(int)
    cm = skm.confusion_matrix(labels, pred, labels=[0, 1])
    tn, fp, fn, tp = (int(x) for x in cm.ravel())
    both = len(np.unique(labels)) == 2
    report = skm.classification_report(labels, pred, labels=[0, 1], target_names=["benign", "melanoma"],
                                       output_dict=True, zero_division=0)
    out = {
        "n": int(len(labels)),
        "n_melanoma": int(labels.sum()),
        "threshold": float(threshold),
        "accuracy": float(skm.accuracy_score(labels, pred)),
        "balanced_accuracy": float(skm.balanced_accuracy_score(labels, pred)) if both else float("nan"),
        "sensitivity": tp / (tp + fn) if tp + fn else float("nan"),
        "specificity": tn / (tn + fp) if tn + fp else float("nan"),
        "confusion_matrix": cm.tolist(),
        "report": report,
        "roc_auc": float(skm.roc_auc_score(labels, probs)) if both else float("nan"),
        "average_precision": float(skm.average_precision_score(labels, probs)) if both else float("nan"),
        "brier": float(skm.brier_score_loss(labels, probs)),
    }
    if both:
        out["partial_auc_above_80_sensitivity"] = partial_auc_above_sensitivity(labels, probs, 0.8)
        out["sensitivity_at_90_specificity"] = sensitivity_at_specificity(labels, probs, 0.9)
    return out


def expected_calibration_error(labels: np.ndarray, probs: np.ndarray, bins: int = 10) -> float:
    """ECE: `bins` equal-width bins on [0, 1] (the last one closed), |mean probability - melanoma fraction|
    in each, weighted by the bin's share of the images. 0 for a perfectly calibrated score."""
    labels = np.asarray(labels, dtype=np.float64)
    probs = np.asarray(probs, dtype=np.float64)
    if len(labels) == 0:
        return float("nan")
    which = np.clip(np.floor(probs * bins).astype(int), 0, bins - 1)
    gap = np.abs(np.bincount(which, probs, bins) - np.bincount(which, labels, bins))
    return float(gap.sum() / len(labels))


def partial_auc_above_sensitivity(labels: np.ndarray, probs: np.ndarray, min_tpr: float = 0.8) -> float:
    """ISIC 2024's score: area between the ROC curve and the line TPR = min_tpr (0 to 1 - min_tpr).

    Flip labels and scores, integrate the flipped ROC curve up to FPR = 1 - min_tpr, no McClish correction.
    """
    max_fpr = 1 - min_tpr
    fpr, tpr, _ = skm.roc_curve(1 - np.asarray(labels), -np.asarray(probs, dtype=float))
    stop = np.searchsorted(fpr, max_fpr, side="right")
    x = np.concatenate([fpr[:stop], [max_fpr]])
    y = np.concatenate([tpr[:stop], [np.interp(max_fpr, fpr, tpr)]])
    return float(np.trapezoid(y, x) if hasattr(np, "trapezoid") else np.trapz(y, x))


def sensitivity_at_specificity(labels: np.ndarray, probs: np.ndarray, specificity: float) -> float:
    fpr, tpr, _ = skm.roc_curve(labels, probs)
    ok = fpr <= 1 - specificity + 1e-12
    return float(tpr[ok].max()) if ok.any() else 0.0


def choose_threshold(labels: np.ndarray, probs: np.ndarray, rule: str, target_sensitivity: float = 0.9,
                     fixed: float = 0.5) -> float:
    """The decision threshold from validation predictions: Youden's J, a target sensitivity, or fixed."""
    if rule == "fixed" or len(np.unique(labels)) < 2:
        return float(fixed)
    fpr, tpr, thresholds = skm.roc_curve(labels, probs)
    thresholds = np.clip(thresholds, 0.0, 1.0)
    if rule == "youden":
        return float(thresholds[int(np.argmax(tpr - fpr))])
    if rule == "sensitivity":
        return float(thresholds[int(np.flatnonzero(tpr >= target_sensitivity)[0])])
    raise ValueError(f"unknown threshold rule {rule!r}")


def bootstrap_ci(labels: np.ndarray, probs: np.ndarray, groups: np.ndarray, threshold: float,
                 n_boot: int = 1000, seed: int = 0, alpha: float = 0.05) -> dict:
    """95% intervals for ROC AUC, balanced accuracy, sensitivity and specificity at `threshold`, resampling
    patients (not images) with replacement; resamples holding one class only are skipped (n_boot counts the rest)."""
    labels, probs, groups = np.asarray(labels), np.asarray(probs), np.asarray(groups)
    rng = np.random.default_rng(seed)
    uniq, inverse = np.unique(groups, return_inverse=True)
    members = [np.flatnonzero(inverse == g) for g in range(len(uniq))]
    values: dict[str, list] = {"roc_auc": [], "balanced_accuracy": [], "sensitivity": [], "specificity": []}
    for _ in range(n_boot):
        pick = rng.integers(0, len(uniq), len(uniq))
        idx = np.concatenate([members[g] for g in pick])
        y = labels[idx]
        if y.min() == y.max():
            continue
        pred = probs[idx] >= threshold
        values["roc_auc"].append(skm.roc_auc_score(y, probs[idx]))
        values["sensitivity"].append(pred[y == 1].mean())
        values["specificity"].append(1 - pred[y == 0].mean())
        values["balanced_accuracy"].append((values["sensitivity"][-1] + values["specificity"][-1]) / 2)
    q = [100 * alpha / 2, 100 * (1 - alpha / 2)]
    out = {f"{name}_ci": [float(v) for v in np.percentile(found, q)] if found else [float("nan")] * 2
           for name, found in values.items()}
    return {**out, **_degenerate_intervals(labels, probs >= threshold, out), "n_boot": len(values["roc_auc"])}


NO_WIDTH = "bootstrap, no width"


def _degenerate_intervals(labels: np.ndarray, pred: np.ndarray, found: dict) -> dict:
    """Where every resample agrees, the bootstrap interval has no width, which would read as certainty. A
    sensitivity or specificity of exactly 0 or 1 gets the Wilson interval of its counts instead; a ROC AUC that
    every resample repeats (perfect separation) is marked, and shown without an interval."""
    out = {}
    for name, hits, n in (("sensitivity", int(pred[labels == 1].sum()), int((labels == 1).sum())),
                          ("specificity", int((~pred[labels == 0]).sum()), int((labels == 0).sum()))):
        if n and hits in (0, n):
            out[f"{name}_ci"], out[f"{name}_ci_method"] = wilson_interval(hits, n), "Wilson (bootstrap: all or none)"
    low, high = found["roc_auc_ci"]
    if np.isfinite(low) and np.isclose(low, high, rtol=0, atol=1e-9):
        out["roc_auc_ci_method"] = f"{NO_WIDTH}: every resample gave {low:.3f}"
    return out


def wilson_interval(hits: int, n: int, z: float = 1.959964) -> list[float]:
    """95% Wilson score interval of a proportion hits / n."""
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [float(max(centre - half, 0.0)), float(min(centre + half, 1.0))]


def interval_text(report: dict, key: str, digits: int = 3, prefix: str = "95% CI ", note: str = "") -> str:
    """' (95% CI low-high)' after a metric (`note` inside the brackets); a no-width bootstrap interval says so
    instead of showing one."""
    ci = report.get(f"{key}_ci")
    if str(report.get(f"{key}_ci_method", "")).startswith(NO_WIDTH):
        return " (no interval: every patient resample gave this value)"
    if not ci or not all(v is not None and np.isfinite(v) for v in ci):
        return ""
    if is_wilson(report, key):  # not the bootstrap interval a heading says: marked ("*" where space is short)
        note += ", Wilson" if prefix else "*"
    return f" ({prefix}{ci[0]:.{digits}f}-{ci[1]:.{digits}f}{note})"


def is_wilson(report: dict, key: str) -> bool:
    """Whether `key`'s interval is the Wilson interval of its counts (see _degenerate_intervals)."""
    return str(report.get(f"{key}_ci_method", "")).startswith("Wilson")


WILSON_NOTE = ("Wilson interval of the counts, not the patient bootstrap: a sensitivity or specificity of exactly "
               "0 or 1, where every resample agrees")


def paired_bootstrap_auc(labels: np.ndarray, probs_a: np.ndarray, probs_b: np.ndarray, groups: np.ndarray,
                         n_boot: int = 1000, seed: int = 0) -> dict:
    """AUC(a) - AUC(b) on the same patient resamples of one test set.

    probs_a / probs_b may be 2-D (seeds x images): each resample then scores the mean difference over seeds.
    Returns the observed difference, its 95% interval, and the share of resamples where b is not worse.
    """
    labels = np.asarray(labels)
    a, b = np.atleast_2d(probs_a), np.atleast_2d(probs_b)

    def mean_diff(idx: np.ndarray) -> float:
        y = labels[idx]
        return float(np.mean([skm.roc_auc_score(y, pa[idx]) for pa in a])
                     - np.mean([skm.roc_auc_score(y, pb[idx]) for pb in b]))

    rng = np.random.default_rng(seed)
    uniq, inverse = np.unique(np.asarray(groups), return_inverse=True)
    members = [np.flatnonzero(inverse == g) for g in range(len(uniq))]
    diffs = []
    for _ in range(n_boot):
        idx = np.concatenate([members[g] for g in rng.integers(0, len(uniq), len(uniq))])
        if labels[idx].min() != labels[idx].max():
            diffs.append(mean_diff(idx))
    diffs = np.asarray(diffs)
    return {"auc_difference": mean_diff(np.arange(len(labels))),
            "ci": [float(v) for v in np.percentile(diffs, [2.5, 97.5])],
            "p_b_not_worse": float((diffs <= 0).mean())}


def knn_probabilities(query: np.ndarray, reference: np.ndarray, reference_labels: np.ndarray, k: int,
                      exclude_self: bool = False, chunk: int = 4096) -> np.ndarray:
    """Similarity-weighted vote of the k most cosine-similar references: P(melanoma) per query.

    Embeddings are L2-normalised, so cosine similarity is a matrix product; weights are (1 + cos) / 2.
    """
    import torch

    ref = torch.tensor(np.asarray(reference, dtype=np.float32))
    ref_labels = torch.tensor(np.asarray(reference_labels, dtype=np.float32))
    k = min(k, len(ref) - int(exclude_self))
    out = []
    for start in range(0, len(query), chunk):
        q = torch.tensor(np.asarray(query[start:start + chunk], dtype=np.float32))
        sims = q @ ref.T
        if exclude_self:
            rows = torch.arange(len(q))
            sims[rows, rows + start] = -float("inf")
        top, idx = sims.topk(k, dim=1)
        weights = (1 + top.clamp(min=-1)) / 2
        out.append(((weights * ref_labels[idx]).sum(1) / weights.sum(1).clamp(min=1e-12)).numpy())
    return np.concatenate(out) if out else np.zeros(0)


def retrieval_metrics(query: np.ndarray, query_labels: np.ndarray, reference: np.ndarray,
                      reference_labels: np.ndarray) -> dict:
    """precision@1 and MAP@R via pytorch-metric-learning's AccuracyCalculator, with an exact cosine kNN."""
    import torch
    from pytorch_metric_learning.distances import CosineSimilarity
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
    from pytorch_metric_learning.utils.inference import CustomKNN

    calculator = AccuracyCalculator(include=("precision_at_1", "mean_average_precision_at_r"),
                                    k="max_bin_count", knn_func=CustomKNN(CosineSimilarity(), batch_size=1024),
                                    device=torch.device("cpu"))
    result = calculator.get_accuracy(torch.as_tensor(query), torch.as_tensor(query_labels),
                                     torch.as_tensor(reference), torch.as_tensor(reference_labels),
                                     ref_includes_query=False)
    return {"precision_at_1": float(result["precision_at_1"]),
            "map_at_r": float(result["mean_average_precision_at_r"])}


def similarity_stats(embeddings: np.ndarray, labels: np.ndarray) -> dict:
    """Mean cosine similarity of same-class and other-class pairs (a collapsing embedding shows here)."""
    import torch

    e = torch.as_tensor(embeddings, dtype=torch.float32)
    y = torch.as_tensor(labels)
    sims = e @ e.T
    same = (y[:, None] == y[None, :]) & ~torch.eye(len(y), dtype=torch.bool)
    other = y[:, None] != y[None, :]
    return {"same_class_similarity": float(sims[same].mean()) if same.any() else float("nan"),
            "other_class_similarity": float(sims[other].mean()) if other.any() else float("nan")}
