import math

import numpy as np
import pandas as pd
import pytest

from melanoma_siamese.data.clinical import CLINICAL_COLUMNS, SITES, clinical_columns, with_clinical
from melanoma_siamese.data.metadata import read_dataset
from melanoma_siamese.runfolder import RunFolder

from helpers import HAM, write_image


# Each source's own column names and words, and what they must become.
SOURCES = {
    "ISIC 2020 Kaggle": {"age_approx": [45.0, None], "sex": ["male", "female"],
                         "anatom_site_general_challenge": ["torso", "lower extremity"]},
    "ISIC Archive / isic-cli": {"age_approx": [45, None], "sex": ["male", "female"],
                                "anatom_site_general": ["posterior torso", "palms/soles"],
                                "fitzpatrick_skin_type": ["II", "VI"]},
    "real sample": {"age_approx": [45.0, None], "sex": ["male", "female"], "anatom_site": ["back", "acral"]},
    "HAM10000 as published": {"age": [45.0, None], "sex": ["male", "female"], "localization": ["chest", "foot"]},
    "ISIC 2019": {"age_approx": [45.0, None], "anatom_site_general": ["anterior torso", "oral/genital"],
                  "sex": ["male", "female"]},
    "ISIC 2024": {"age_approx": [45, None], "sex": ["male", "female"],
                  "anatom_site_general": ["lateral torso", "head/neck"]},
}
EXPECTED_SITES = {
    "ISIC 2020 Kaggle": ["torso", "lower extremity"], "ISIC Archive / isic-cli": ["torso", "palms/soles"],
    "real sample": ["torso", "palms/soles"], "HAM10000 as published": ["torso", "lower extremity"],
    "ISIC 2019": ["torso", "oral/genital"], "ISIC 2024": ["torso", "head/neck"],
}


@pytest.mark.parametrize("source", list(SOURCES))
def test_each_source_maps_to_the_four_columns(source):
    table = pd.DataFrame({"isic_id": ["a", "b"], **SOURCES[source]})
    clinical = clinical_columns(table, "m.csv")
    out = clinical.table
    assert list(out.columns) == list(CLINICAL_COLUMNS)
    assert out.loc[0, "age"] == 45.0 and math.isnan(out.loc[1, "age"])
    assert out["sex"].tolist() == ["male", "female"]
    assert out["site"].tolist() == EXPECTED_SITES[source]
    assert set(out["site"]) <= set(SITES)
    skin = ["II", "VI"] if "fitzpatrick_skin_type" in SOURCES[source] else ["", ""]
    assert out["skin_type"].tolist() == skin
    assert not clinical.warnings


def test_unknown_values_are_missing_and_counted_in_a_warning():
    table = pd.DataFrame({"age": ["40", "old", "-3", "unknown"], "sex": ["M", "x", "x", "unknown"],
                          "localization": ["Back", "elbow", "unknown", "elbow"],
                          "fitzpatrick_skin_type": ["3", "VII", "", "iv"]})
    clinical = clinical_columns(table, "meta.csv")
    out = clinical.table
    assert out["age"].tolist()[0] == 40.0 and out["age"].isna().tolist() == [False, True, True, True]
    assert out["sex"].tolist() == ["male", "", "", ""]
    assert out["site"].tolist() == ["torso", "", "", ""]
    assert out["skin_type"].tolist() == ["III", "", "", "IV"]
    text = "\n".join(clinical.warnings)
    assert len(clinical.warnings) == 4  # one per column with unknown words; "unknown" itself is silent
    assert "meta.csv: column 'localization': 2 row(s)" in text and "'elbow' (2)" in text
    assert "column 'sex': 2 row(s)" in text and "'x' (2)" in text
    assert "column 'age': 2 row(s)" in text and "'old' (1)" in text and "'-3' (1)" in text
    assert "column 'fitzpatrick_skin_type': 1 row(s)" in text and "'vii' (1)" in text


def test_table_without_clinical_columns_gets_them_empty(tmp_path):
    write_image(tmp_path / "train-image" / "image" / "ISIC_1.jpg")
    pd.DataFrame({"isic_id": ["ISIC_1"], "patient_id": ["P"], "target": [1]}).to_csv(
        tmp_path / "train-metadata.csv", index=False)
    dataset = read_dataset(tmp_path)
    row = dataset.table.iloc[0]
    assert math.isnan(row["age"]) and (row["sex"], row["site"], row["skin_type"]) == ("", "", "")
    assert dataset.clinical_sources == dict.fromkeys(CLINICAL_COLUMNS)
    assert not any("not understood" in w for w in dataset.warnings)


def test_read_dataset_announces_unknown_words(tmp_path):
    write_image(tmp_path / "a.jpg")
    pd.DataFrame({"isic_id": ["a"], "target": [0], "anatom_site_general": ["left knee"]}).to_csv(
        tmp_path / "metadata.csv", index=False)
    dataset = read_dataset(tmp_path)
    assert dataset.table["site"].tolist() == [""]
    assert dataset.clinical_sources["site"] == "anatom_site_general"
    assert any("'left knee' (1)" in w for w in dataset.warnings)


def test_split_csv_without_clinical_columns_still_loads(tmp_path):
    pd.DataFrame({"isic_id": ["a", "b"], "patient_id": ["P", "Q"], "target": [0, 1],
                  "part": ["train", "test"]}).to_csv(tmp_path / "split.csv", index=False)
    split = RunFolder(tmp_path).read_split()
    assert split["age"].isna().all() and (split[["sex", "site", "skin_type"]] == "").all().all()


def test_split_csv_keeps_clinical_columns(tmp_path):
    frame = pd.DataFrame({"isic_id": ["a", "b"], "patient_id": ["P", "Q"], "target": [0, 1],
                          "part": ["train", "test"], "age": [55.0, np.nan], "sex": ["female", ""],
                          "site": ["", "torso"], "skin_type": ["II", ""]})
    frame.to_csv(tmp_path / "split.csv", index=False)
    split = RunFolder(tmp_path).read_split()
    assert split.loc[0, "age"] == 55.0 and math.isnan(split.loc[1, "age"])
    assert split["sex"].tolist() == ["female", ""] and split["site"].tolist() == ["", "torso"]
    assert split["skin_type"].tolist() == ["II", ""]
    assert with_clinical(frame)["sex"].tolist() == ["female", ""]


def test_real_sample_has_ages_sexes_and_sites():
    if not HAM.is_dir():
        pytest.skip(f"the real sample is absent ({HAM}); see its README")
    dataset = read_dataset(HAM)
    table = dataset.table
    assert dataset.clinical_sources == {"age": "age_approx", "sex": "sex", "site": "anatom_site",
                                        "skin_type": None}
    assert len(table) == 2000
    # The sample's own counts: 12 ages missing, 11 sexes 'unknown', 52 sites 'unknown'.
    assert int(table["age"].isna().sum()) == 12
    assert int((table["sex"] == "").sum()) == 11
    assert int((table["site"] == "").sum()) == 52
    assert table["site"].value_counts().to_dict() == {
        "torso": 429 + 286 + 202 + 71, "lower extremity": 422 + 66, "upper extremity": 230 + 13,
        "head/neck": 144 + 37 + 25 + 14, "": 52, "oral/genital": 9}
    assert (table["skin_type"] == "").all()
    assert not any("not understood" in w for w in dataset.warnings)


def test_write_split_keeps_the_clinical_columns(tmp_path):
    from melanoma_siamese.data.prepare import Prepared, write_split

    write_image(tmp_path / "a.jpg")
    write_image(tmp_path / "b.jpg")
    pd.DataFrame({"isic_id": ["a", "b"], "target": [0, 1], "age_approx": [30, None], "sex": ["female", "male"],
                  "anatom_site_general": ["head/neck", "unknown"], "fitzpatrick_skin_type": ["I", None]}).to_csv(
        tmp_path / "metadata.csv", index=False)
    dataset = read_dataset(tmp_path)
    prepared = Prepared(dataset.table.assign(part=["train", "test"]), np.zeros((2, 1, 1, 3), np.uint8), dataset)
    run = RunFolder(tmp_path / "run")
    run.root.mkdir()
    write_split(prepared, run.split)
    split = run.read_split()
    assert list(split.columns) == ["isic_id", "patient_id", "target", "part", *CLINICAL_COLUMNS]
    assert split.loc[0, "age"] == 30.0 and math.isnan(split.loc[1, "age"])
    assert split["sex"].tolist() == ["female", "male"] and split["site"].tolist() == ["head/neck", ""]
    assert split["skin_type"].tolist() == ["I", ""]
