"""The melanoma label (1 = melanoma, 0 = not) from whatever a dataset records, and the rule that says how.

Every rule ends in `Labels`, whose `rule` sentence ("labels from column X: ... -> melanoma") is printed
when a run starts and recorded in run.json, so nobody has to guess which images counted as melanoma.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import pandas as pd

from ..errors import Problem

BENIGN_MALIGNANT = {
    "malignant": 1,
    "benign": 0,
    "indeterminate": 0,
    "indeterminate/benign": 0,
    "indeterminate/malignant": 0,
}
# Columns whose text names the diagnosis itself: melanoma where it contains "melanoma" or is the code
# "mel" (HAM10000's dx). isic-cli writes diagnosis_1..5, ISIC 2024 iddx_1..5 (the same hierarchy).
DIAGNOSIS_COLUMNS = ("diagnosis_3", "iddx_3", "diagnosis", "dx")
# (parent, child): the parent level "Malignant melanocytic proliferations (Melanoma)" with the finer level
# left empty is a melanoma whose subtype was not recorded.
HIERARCHY_PAIRS = (("diagnosis_2", "diagnosis_3"), ("iddx_2", "iddx_3"))
ALL_DIAGNOSIS_COLUMNS = ("diagnosis_1", "diagnosis_2", "diagnosis_3", "diagnosis_4", "diagnosis_5", "diagnosis", "dx")
MELANOMA_CODES = ("mel",)
# The one-hot ground truth of ISIC 2018 Task 3 (AKIEC) and ISIC 2019 (AK, SCC, UNK).
ONE_HOT_CLASSES = ("MEL", "NV", "BCC", "AKIEC", "AK", "BKL", "DF", "VASC", "SCC", "UNK")


@dataclass
class Labels:
    values: pd.Series  # 1 melanoma, 0 not, -1 where unusable (a problem says why)
    rule: str  # how, with the count: printed when a run starts, recorded in run.json
    problems: list[Problem] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _text(value) -> str:
    return "" if value is None or (isinstance(value, float) and np.isnan(value)) else str(value).strip()


def _count(labels: pd.Series) -> str:
    return f"{int((labels == 1).sum())} of {len(labels)} melanoma"


def _unset(table: pd.DataFrame) -> pd.Series:
    return pd.Series(np.full(len(table), -1, dtype=np.int64), index=table.index)


def derive_labels(table: pd.DataFrame, file: str) -> Labels:
    """From `target` (0/1), else `benign_malignant`, else one-hot `MEL`, else the diagnosis columns."""
    if "target" in table.columns:
        return labels_from_binary(table, file, "target", "0 (not melanoma) or 1 (melanoma)")
    if "benign_malignant" in table.columns:
        return _labels_from_benign_malignant(table, file)
    if "MEL" in table.columns:
        return labels_from_one_hot(table, file, ONE_HOT_CLASSES)
    present = [c for c in ALL_DIAGNOSIS_COLUMNS + ("iddx_2", "iddx_3") if c in table.columns]
    if not present:
        problem = Problem(file, "no label column; expected 'target' (0/1), 'benign_malignant', or the diagnosis "
                          "columns isic-cli writes (diagnosis_1..diagnosis_3 or diagnosis), or HAM10000's dx; "
                          f"columns found: {', '.join(map(str, table.columns))}", "target")
        return Labels(_unset(table), "no labels", [problem])
    return labels_from_diagnosis(table, file, present)


def labels_from_binary(table: pd.DataFrame, file: str, column: str, expected: str) -> Labels:
    """A 0/1 column (ISIC 2020's `target`, a one-hot `MEL`): 1 -> melanoma."""
    labels, problems = _unset(table), []
    ids = table["isic_id"].astype(str)
    for i, value in table[column].items():
        text = _text(value)
        try:
            number = float(text)
        except ValueError:
            number = None
        if number in (0.0, 1.0):
            labels[i] = int(number)
        else:
            problems.append(Problem(file, f"image {ids[i]}: {column} must be {expected}", column, text or "<empty>"))
    return Labels(labels, f"labels from column '{column}': 1 -> melanoma, 0 -> not ({_count(labels)})", problems)


def _labels_from_benign_malignant(table: pd.DataFrame, file: str) -> Labels:
    labels, problems, warnings = _unset(table), [], []
    ids = table["isic_id"].astype(str)
    for i, value in table["benign_malignant"].items():
        text = _text(value).lower()
        if text in BENIGN_MALIGNANT:
            labels[i] = BENIGN_MALIGNANT[text]
        else:
            problems.append(Problem(file, f"image {ids[i]}: benign_malignant must be one of "
                                    f"{', '.join(BENIGN_MALIGNANT)}", "benign_malignant", text or "<empty>"))
    rule = (f"no 'target' column; labels from column 'benign_malignant': malignant -> melanoma (1), benign "
            f"and indeterminate -> 0 ({_count(labels)})")
    if "diagnosis" in table.columns:
        diagnosis = table["diagnosis"].map(_text).str.lower()
        other = (labels == 1) & ~diagnosis.str.contains("melanoma") & (diagnosis != "") & (diagnosis != "unknown")
        if other.any():
            kinds = ", ".join(sorted(set(diagnosis[other])))
            warnings.append(
                f"{file}: {int(other.sum())} image(s) are 'malignant' with a diagnosis that is not melanoma "
                f"({kinds}); they are labelled 1 (melanoma) as in ISIC 2020's target. Add a 'target' column "
                "to label them otherwise."
            )
    return Labels(labels, rule, problems, warnings)


def labels_from_diagnosis(table: pd.DataFrame, file: str, present: Sequence[str]) -> Labels:
    """Melanoma = a diagnosis naming melanoma (or the code 'mel'), or a melanoma parent level with the finer
    level empty; any other diagnosis 0."""
    labels, problems = _unset(table), []
    ids = table["isic_id"].astype(str)
    texts = {c: table[c].map(_text).str.lower() for c in present}
    for i in table.index:
        if not any(texts[c][i] for c in present):
            problems.append(Problem(file, f"image {ids[i]}: no diagnosis in any of {', '.join(present)}; "
                                    "expected a diagnosis text (melanoma = 1, anything else = 0)",
                                    present[0], "<empty>"))
            continue
        named = any("melanoma" in texts[c][i] or texts[c][i] in MELANOMA_CODES
                    for c in DIAGNOSIS_COLUMNS if c in texts)
        parent = any(p in texts and "melanoma" in texts[p][i] and not (c in texts and texts[c][i])
                     for p, c in HIERARCHY_PAIRS)
        labels[i] = int(named or parent)
    parents = [p for p, _ in HIERARCHY_PAIRS if p in texts]
    used = [c for c in DIAGNOSIS_COLUMNS if c in texts] + parents
    also = "".join(f", or {p} naming melanoma with {c} empty" for p, c in HIERARCHY_PAIRS if p in texts)
    rule = (f"labels from column(s) {', '.join(used or present)}: a diagnosis containing 'melanoma', or the code "
            f"'mel'{also}, -> melanoma (1), any other -> 0 ({_count(labels)})")
    return Labels(labels, rule, problems)


def labels_from_one_hot(table: pd.DataFrame, file: str, columns: Sequence[str]) -> Labels:
    """ISIC 2018 Task 3 / ISIC 2019 ground truth: one 1.0 per row among `columns`; MEL = melanoma."""
    labels = labels_from_binary(table, file, "MEL", "0 or 1 (the one-hot MEL column)")
    present = [c for c in columns if c in table.columns]
    hot = table[present].apply(pd.to_numeric, errors="coerce").fillna(0).sum(axis=1)
    ids = table["isic_id"].astype(str)
    for i in table.index[(hot != 1) & (labels.values >= 0)]:
        labels.problems.append(Problem(file, f"image {ids[i]}: expected exactly one 1 among the one-hot columns "
                                       f"{', '.join(present)}", "MEL", f"{int(hot[i])} columns set"))
        labels.values[i] = -1
    labels.rule = (f"labels from the one-hot column 'MEL' (of {', '.join(present)}): MEL 1 -> melanoma, any other "
                   f"class -> 0 ({_count(labels.values)})")
    return labels


def isic2024_labels(table: pd.DataFrame, file: str) -> Labels:
    """ISIC 2024's `target` is 1 for any malignant lesion (basal and squamous cell carcinomas too), so the
    diagnosis columns decide where present."""
    present = [c for c in ("iddx_2", "iddx_3") if c in table.columns]
    if present:
        labels = labels_from_diagnosis(table, file, present)
        labels.rule = "ISIC 2024's target is 1 for any malignancy, so not used; " + labels.rule
        return labels
    labels = labels_from_binary(table, file, "target", "0 or 1")
    labels.warnings.append(f"{file}: no iddx_2/iddx_3 columns; labels from 'target', which in ISIC 2024 is 1 for "
                           "any malignant lesion (basal and squamous cell carcinomas too), not melanoma alone")
    labels.rule = f"labels from column 'target': 1 (malignant, any kind) -> 1, 0 -> 0 ({_count(labels.values)})"
    return labels
