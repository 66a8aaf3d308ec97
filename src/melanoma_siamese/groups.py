"""Results by group: ROC AUC, sensitivity and specificity at the run's threshold, with counts and
patient-bootstrap intervals, by sex, age band, anatomical site and Fitzpatrick skin type.

Groups come from the clinical columns every dataset table carries (`age`, `sex`, `site`, `skin_type`;
see data/clinical.py); an empty value is the group "unknown". No models, no files.
"""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import pandas as pd

from .metrics import NO_WIDTH, WILSON_NOTE, bootstrap_ci, interval_text, is_wilson

# Fewer melanomas than this in a group (or no benign image) and its numbers say nothing: flagged, not hidden.
MIN_MELANOMA = 5
AGE_BANDS = ((0, 30, "under 30"), (30, 45, "30-44"), (45, 60, "45-59"), (60, 75, "60-74"), (75, 200, "75 and over"))
GROUPINGS = ("sex", "age band", "site", "skin type")
UNKNOWN = "unknown"


def age_band(age: float) -> str:
    if age is None or not np.isfinite(age):
        return UNKNOWN
    return next((name for low, high, name in AGE_BANDS if low <= age < high), UNKNOWN)


def group_labels(frame: pd.DataFrame) -> dict[str, pd.Series]:
    """Each grouping's group name per image; a grouping whose column is absent or empty everywhere is left out."""
    def text(column: str) -> pd.Series:
        values = frame[column].fillna("").astype(str).str.strip() if column in frame else pd.Series("", frame.index)
        return values.where(values != "", UNKNOWN)

    ages = pd.to_numeric(frame["age"], errors="coerce") if "age" in frame else pd.Series(np.nan, frame.index)
    out = {"sex": text("sex"), "age band": ages.map(age_band), "site": text("site"), "skin type": text("skin_type")}
    return {name: values for name, values in out.items() if (values != UNKNOWN).any()}


def group_result(labels: np.ndarray, probs: np.ndarray, patients: np.ndarray, threshold: float,
                 n_boot: int, seed: int) -> dict:
    """One group's counts, and its metrics with intervals unless it has too few melanomas to say anything."""
    labels, probs = np.asarray(labels).astype(int), np.asarray(probs, dtype=float)
    pred = probs >= threshold
    melanoma, benign = int(labels.sum()), int((labels == 0).sum())
    out = {"images": int(len(labels)), "patients": int(len(np.unique(patients))), "melanoma": melanoma,
           "benign": benign, "melanoma_detected": int(pred[labels == 1].sum()),
           "benign_flagged": int(pred[labels == 0].sum())}
    if melanoma < MIN_MELANOMA or benign == 0:
        why = f"{melanoma} melanoma" if melanoma < MIN_MELANOMA else "no benign image"
        return {**out, "too_few_to_say": True,
                "note": f"too few to say ({why}; at least {MIN_MELANOMA} melanoma and 1 benign needed)",
                "roc_auc": None, "sensitivity": None, "specificity": None}
    from sklearn.metrics import roc_auc_score

    out.update({"too_few_to_say": False, "roc_auc": float(roc_auc_score(labels, probs)),
                "sensitivity": float(pred[labels == 1].mean()), "specificity": float(1 - pred[labels == 0].mean())})
    if n_boot:
        ci = bootstrap_ci(labels, probs, patients, threshold, n_boot, seed)
        out.update({k: v for k, v in ci.items() if k.startswith(("roc_auc_ci", "sensitivity_ci", "specificity_ci"))})
        out["n_boot"] = ci["n_boot"]
    return out


def results_by_group(frame: pd.DataFrame, prob_column: str, threshold: float, n_boot: int = 1000,
                     seed: int = 0) -> dict:
    """{"threshold", "min_melanoma", "groupings": {grouping: {group: result}}, "absent": [groupings not in the data]}.

    `frame` holds target, patient_id, the score column and the clinical columns it has."""
    labels = group_labels(frame)
    y, p, patients = frame["target"].to_numpy(), frame[prob_column].to_numpy(), frame["patient_id"].to_numpy()
    groupings = {}
    for name, values in labels.items():
        groupings[name] = {}
        for group in sorted(values.unique(), key=lambda g: (g == UNKNOWN, _order(name, g))):
            keep = (values == group).to_numpy()
            groupings[name][group] = group_result(y[keep], p[keep], patients[keep], threshold, n_boot, seed)
    return {"threshold": float(threshold), "score": prob_column, "min_melanoma": MIN_MELANOMA,
            "groupings": groupings, "absent": [g for g in GROUPINGS if g not in labels]}


def _order(grouping: str, group: str):
    if grouping == "age band":
        return [name for _, _, name in AGE_BANDS].index(group) if group != UNKNOWN else 99
    if grouping == "skin type":
        roman = ("I", "II", "III", "IV", "V", "VI")
        return roman.index(group) if group in roman else 99
    return group


def _interval(result: dict, key: str) -> str:
    if str(result.get(f"{key}_ci_method", "")).startswith(NO_WIDTH):
        return f"{result[key]:.2f} (no width)"
    return f"{result[key]:.2f}{interval_text(result, key, 2, '')}"


def table_lines(report: dict) -> list[str]:
    """A compact table: one line per group, counts first; flagged groups say so instead of numbers."""
    lines = [f"{'group':<30} {'images':>6} {'melanoma':>8}  {'ROC AUC (95% CI)':<18} {'sensitivity':<18} specificity"]
    for grouping, groups in report["groupings"].items():
        for group, r in groups.items():
            head = f"{grouping + ': ' + group:<30} {r['images']:>6} {r['melanoma']:>8}  "
            if r["too_few_to_say"]:
                lines.append(head + r["note"])
            else:
                lines.append(head + f"{_interval(r, 'roc_auc'):<18} {_interval(r, 'sensitivity'):<18} "
                             f"{_interval(r, 'specificity')}")
    if any(is_wilson(r, key) for groups in report["groupings"].values() for r in groups.values()
           for key in ("sensitivity", "specificity")):
        lines.append(f"* {WILSON_NOTE}")
    if report["absent"]:
        lines.append(f"Not in the data: {', '.join(report['absent'])}")
    return lines


def print_groups(report: dict, log: Callable[[str], None], title: Optional[str] = None) -> None:
    log(title or f"--- Test results by group (threshold {report['threshold']:.4f}; patient-bootstrap 95% CIs) ---")
    for line in table_lines(report):
        log(line)
