"""Results by group: counts, the too-few flag, intervals, the table and the plot."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn import metrics as skm

from melanoma_siamese import plots
from melanoma_siamese.groups import age_band, group_labels, results_by_group, table_lines


def _frame(n=400, seed=0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.3).astype(int)
    sex = rng.choice(["female", "male", ""], n, p=[0.45, 0.45, 0.1])
    # The score is good for women and random for men: results by group must show the difference.
    p = np.where(sex == "female", np.clip(0.35 * y + rng.random(n) * 0.65, 0, 1), rng.random(n))
    age = rng.uniform(20, 90, n)
    age[:20] = np.nan
    site = rng.choice(["torso", "head/neck", "palms/soles", ""], n, p=[0.5, 0.3, 0.02, 0.18])
    return pd.DataFrame({"isic_id": [f"I{i}" for i in range(n)], "patient_id": [f"P{i // 2}" for i in range(n)],
                         "target": y, "prob_melanoma": p, "age": age, "sex": sex, "site": site, "skin_type": ""})


def test_age_bands():
    assert [age_band(a) for a in (5, 29.9, 30, 44, 45, 60, 74.5, 75, 101, float("nan"))] == [
        "under 30", "under 30", "30-44", "30-44", "45-59", "60-74", "60-74", "75 and over", "75 and over", "unknown"]


def test_groups_count_score_and_flag():
    frame = _frame()
    report = results_by_group(frame, "prob_melanoma", 0.5, n_boot=100, seed=0)
    assert set(report["groupings"]) == {"sex", "age band", "site"}
    assert report["absent"] == ["skin type"]
    female = report["groupings"]["sex"]["female"]
    rows = frame[frame["sex"] == "female"]
    assert female["images"] == len(rows) and female["melanoma"] == rows["target"].sum()
    assert female["roc_auc"] == pytest.approx(skm.roc_auc_score(rows["target"], rows["prob_melanoma"]))
    pred = rows["prob_melanoma"] >= 0.5
    assert female["sensitivity"] == pytest.approx(pred[rows["target"] == 1].mean())
    assert female["melanoma_detected"] == int(pred[rows["target"] == 1].sum())
    assert female["roc_auc_ci"][0] <= female["roc_auc"] <= female["roc_auc_ci"][1]
    assert female["roc_auc"] > report["groupings"]["sex"]["male"]["roc_auc"] + 0.1
    # Missing values form their own group, listed last; a rare site is flagged with its counts kept.
    assert list(report["groupings"]["sex"]) == ["female", "male", "unknown"]
    rare = report["groupings"]["site"]["palms/soles"]
    assert rare["too_few_to_say"] and rare["roc_auc"] is None and rare["images"] > 0
    assert "too few to say" in rare["note"]
    assert list(report["groupings"]["age band"])[-1] == "unknown"
    assert sum(g["images"] for g in report["groupings"]["age band"].values()) == len(frame)


def test_all_detected_gets_a_wilson_interval_not_a_zero_width_one():
    from melanoma_siamese.metrics import wilson_interval

    # Published values of the 95% Wilson interval for 10 of 10 and 0 of 10.
    assert wilson_interval(10, 10) == pytest.approx([0.7225, 1.0], abs=1e-4)
    assert wilson_interval(0, 10) == pytest.approx([0.0, 0.2775], abs=1e-4)
    frame = _frame()
    frame.loc[frame["target"] == 1, "prob_melanoma"] = 1.0  # every melanoma detected at any threshold
    report = results_by_group(frame, "prob_melanoma", 0.5, n_boot=50)
    female = report["groupings"]["sex"]["female"]
    n = female["melanoma"]
    assert female["sensitivity"] == 1.0 and female["sensitivity_ci_method"].startswith("Wilson")
    assert female["sensitivity_ci"] == pytest.approx(wilson_interval(n, n))
    assert female["sensitivity_ci"][0] < 1.0
    # The printed table (headed "patient-bootstrap 95% CIs") marks it and says what the mark means.
    lines = table_lines(report)
    female_line = next(line for line in lines if line.startswith("sex: female"))
    assert f"1.00 ({female['sensitivity_ci'][0]:.2f}-1.00*)" in female_line
    assert lines[-1 if not report["absent"] else -2].startswith("* Wilson interval of the counts")


def test_no_clinical_columns_no_groups():
    frame = _frame()[["isic_id", "patient_id", "target", "prob_melanoma"]]
    assert group_labels(frame) == {}
    report = results_by_group(frame, "prob_melanoma", 0.5, n_boot=0)
    assert report["groupings"] == {} and len(report["absent"]) == 4


def test_table_and_plot(tmp_path):
    report = results_by_group(_frame(), "prob_melanoma", 0.5, n_boot=50)
    lines = table_lines(report)
    assert any(line.startswith("site: palms/soles") and "too few to say" in line for line in lines)
    assert any(line.startswith("sex: female") and "(" in line for line in lines)
    assert lines[-1] == "Not in the data: skin type"
    plots.results_by_group(report, tmp_path / "groups.png")
    assert (tmp_path / "groups.png").stat().st_size > 5000
