import numpy as np
import pandas as pd

from melanoma_siamese.data.split import (balanced_subsample, patient_split, split_problems,
                                         subsample_train_melanoma)


def _table(n_patients=200, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        for _ in range(rng.integers(1, 6)):
            rows.append({"patient_id": f"P{p}", "target": int(rng.random() < 0.1)})
    return pd.DataFrame(rows)


def test_no_patient_in_two_parts_and_fractions():
    table = _table()
    part = patient_split(table, 0.1, 0.2, seed=3)
    per_patient = table.assign(part=part).groupby("patient_id")["part"].nunique()
    assert (per_patient == 1).all()
    shares = part.value_counts(normalize=True)
    assert abs(shares["test"] - 0.2) < 0.05 and abs(shares["val"] - 0.1) < 0.05
    for name in ("train", "val", "test"):
        assert table["target"][part == name].sum() > 0  # stratified: each part holds melanoma


def test_split_is_seeded():
    table = _table()
    assert patient_split(table, 0.1, 0.2, 1).equals(patient_split(table, 0.1, 0.2, 1))
    assert not patient_split(table, 0.1, 0.2, 1).equals(patient_split(table, 0.1, 0.2, 2))


def test_too_few_patients_of_a_class():
    table = pd.DataFrame({"patient_id": [f"P{i}" for i in range(30)], "target": [1, 1] + [0] * 28})
    problems = split_problems(table, 0.1, 0.2, "meta.csv")
    assert len(problems) == 1 and "melanoma" in str(problems[0]) and "column 'target'" in str(problems[0])


def test_balanced_subsample_same_for_seed():
    labels = np.array([0] * 90 + [1] * 10)
    a, b = balanced_subsample(labels, 136, 0), balanced_subsample(labels, 136, 0)
    assert (a == b).all() and labels[a].sum() == 10 and len(a) == 20
    assert not np.array_equal(a, balanced_subsample(labels, 136, 1))


def test_train_melanoma_fraction_only_touches_train():
    table = _table(400)
    part = patient_split(table, 0.1, 0.2, 0)
    sub = subsample_train_melanoma(table, part, 0.05, 0)
    assert (sub[part != "train"] == part[part != "train"]).all()
    train = sub == "train"
    assert abs(table["target"][train].mean() - 0.05) < 0.01
    assert (table["target"][sub == "train_unused"] == 1).all()
