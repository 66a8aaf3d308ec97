import pandas as pd
import pytest

from melanoma_siamese.data.metadata import DataError, detect_layout, read_dataset

from helpers import write_image


def test_kaggle_layout(tmp_path):
    write_image(tmp_path / "train-image" / "image" / "ISIC_1.jpg")
    write_image(tmp_path / "train-image" / "image" / "ISIC_2.jpg")
    pd.DataFrame({"isic_id": ["ISIC_1", "ISIC_2"], "patient_id": ["P1", "P2"], "target": [0, 1],
                  "age_approx": [40, 50]}).to_csv(tmp_path / "train-metadata.csv", index=False)
    ds = read_dataset(tmp_path)
    assert ds.layout == "kaggle-256" and not ds.problems
    assert ds.table["target"].tolist() == [0, 1]
    assert ds.table["path"].str.endswith(".jpg").all()
    assert "age_approx" in ds.table.columns  # other columns are kept


def test_original_isic2020_with_duplicates_and_dicom_ignored(tmp_path):
    for name in ("ISIC_A", "ISIC_B", "ISIC_C"):
        write_image(tmp_path / "jpeg" / "train" / f"{name}.jpg")
        (tmp_path / "train").mkdir(exist_ok=True)
        (tmp_path / "train" / f"{name}.dcm").write_bytes(b"DICM not an image")
    pd.DataFrame({"image_name": ["ISIC_A", "ISIC_B", "ISIC_C"], "patient_id": ["P1", "P1", "P2"],
                  "benign_malignant": ["benign", "malignant", "benign"], "target": [0, 1, 0],
                  "diagnosis": ["nevus", "melanoma", "unknown"]}).to_csv(tmp_path / "train.csv", index=False)
    pd.DataFrame({"image_name_1": ["ISIC_A"], "image_name_2": ["ISIC_C"]}).to_csv(
        tmp_path / "ISIC_2020_Training_Duplicates.csv", index=False)
    ds = read_dataset(tmp_path)
    assert ds.layout == "isic-2020-kaggle"
    assert ds.dropped_duplicates == 1
    assert ds.table["isic_id"].tolist() == ["ISIC_A", "ISIC_B"]
    assert all("/jpeg/train/" in p for p in ds.table["path"])


def test_isic_site_ground_truth_v2(tmp_path):
    write_image(tmp_path / "ISIC_2020_Training_JPEG" / "train" / "ISIC_X.jpg")
    pd.DataFrame({"image_name": ["ISIC_X"], "patient_id": ["P"], "benign_malignant": ["Malignant"],
                  "diagnosis": ["lentigo NOS"]}).to_csv(tmp_path / "ISIC_2020_Training_GroundTruth_v2.csv", index=False)
    ds = read_dataset(tmp_path)
    assert ds.layout == "isic-2020-site"
    assert ds.table["target"].tolist() == [1]
    assert any("not melanoma" in w and "lentigo nos" in w for w in ds.warnings)


def test_isic_cli_text_diagnoses(tmp_path):
    ids = ["ISIC_0000001", "ISIC_0000002", "ISIC_0000003", "ISIC_0000004"]
    for i in ids:
        write_image(tmp_path / f"{i}.jpg")
    pd.DataFrame({
        "isic_id": ids,
        "diagnosis_1": ["Malignant", "Benign", "Indeterminate", "Malignant"],
        "diagnosis_3": ["Melanoma Invasive", "Nevus", "Atypical melanocytic proliferation", "Basal cell carcinoma"],
        "patient_id": ["IP_1", "IP_1", None, "IP_3"],
        "copyright_license": ["CC-BY-NC"] * 4,
    }).to_csv(tmp_path / "metadata.csv", index=False)
    ds = read_dataset(tmp_path)
    assert ds.layout == "isic-cli"
    assert ds.table["target"].tolist() == [1, 0, 0, 0]
    assert ds.table.loc[2, "patient_id"] == "single:ISIC_0000003"
    assert any("no patient_id" in w for w in ds.warnings)


def test_diagnosis_column_melanoma_case_insensitive(tmp_path):
    write_image(tmp_path / "a.jpg")
    write_image(tmp_path / "b.jpg")
    pd.DataFrame({"isic_id": ["a", "b"], "diagnosis": ["MELANOMA", "seborrheic keratosis"]}).to_csv(
        tmp_path / "metadata.csv", index=False)
    assert read_dataset(tmp_path).table["target"].tolist() == [1, 0]


def test_custom_metadata_and_images(tmp_path):
    write_image(tmp_path / "imgs" / "x1.png")
    pd.DataFrame({"image_id": ["x1"], "target": [1]}).to_csv(tmp_path / "m.csv", index=False)
    ds = read_dataset(metadata=tmp_path / "m.csv", images=tmp_path / "imgs")
    assert ds.layout == "custom" and ds.table["path"][0].endswith("x1.png")


def test_problems_name_file_column_value(tmp_path):
    write_image(tmp_path / "train-image" / "image" / "ISIC_1.jpg")
    pd.DataFrame({"isic_id": ["ISIC_1", "ISIC_1", "ISIC_2"], "patient_id": ["P", "P", "Q"],
                  "target": [0, 0, "maybe"]}).to_csv(tmp_path / "train-metadata.csv", index=False)
    messages = [str(p) for p in read_dataset(tmp_path).problems]
    assert any("duplicate image id" in m and "'ISIC_1'" in m for m in messages)
    assert any("column 'target'" in m and "'maybe'" in m and "0 (not melanoma) or 1" in m for m in messages)
    assert any("absent" in m and "ISIC_2" in m for m in messages)


def test_missing_id_column_lists_columns(tmp_path):
    pd.DataFrame({"name": ["a"], "target": [0]}).to_csv(tmp_path / "train-metadata.csv", index=False)
    with pytest.raises(DataError) as err:
        read_dataset(tmp_path)
    assert "isic_id" in str(err.value) and "columns found: name, target" in str(err.value)


def test_no_label_column_is_named(tmp_path):
    write_image(tmp_path / "a.jpg")
    pd.DataFrame({"isic_id": ["a"], "sex": ["m"]}).to_csv(tmp_path / "metadata.csv", index=False)
    problems = read_dataset(tmp_path).problems
    assert any("no label column" in str(p) and "columns found: isic_id, sex" in str(p) for p in problems)


def test_unknown_layout_says_what_is_expected(tmp_path):
    (tmp_path / "something.txt").write_text("x")
    with pytest.raises(DataError, match="no known layout.*something.txt"):
        detect_layout(tmp_path)


def test_one_list_of_image_extensions_for_datasets_and_predict(tmp_path):
    from melanoma_siamese.inputs import expand_inputs

    folder = tmp_path / "train-image" / "image"
    for name in ("ISIC_1.jpg", "ISIC_2.png", "ISIC_3.bmp", "ISIC_4.tiff", "ISIC_5.webp"):
        write_image(folder / name)
    (folder / "notes.txt").write_text("not an image")
    pd.DataFrame({"isic_id": [f"ISIC_{i}" for i in range(1, 6)], "patient_id": ["P1", "P2", "P3", "P4", "P5"],
                  "target": [0, 1, 0, 1, 0]}).to_csv(tmp_path / "train-metadata.csv", index=False)
    ds = read_dataset(tmp_path)
    assert not ds.problems and (ds.table["path"] != "").all()
    assert sorted(map(str, expand_inputs([folder]))) == sorted(ds.table["path"])


@pytest.mark.parametrize("columns, announced", [
    ({"diagnosis": ["Melanoma", "Nevus", "Nevus"]}, "labels from column(s) diagnosis"),
    ({"benign_malignant": ["malignant", "benign", "benign"]}, "labels from column 'benign_malignant'"),
])
def test_labels_not_from_target_are_announced(columns, announced):
    from melanoma_siamese.data.metadata import derive_labels

    table = pd.DataFrame({"isic_id": ["a", "b", "c"], **columns})
    labels = derive_labels(table, "metadata.csv")
    assert list(labels.values) == [1, 0, 0] and not labels.problems
    assert announced in labels.rule and "1 of 3 melanoma" in labels.rule


def test_ham10000_metadata_labels_from_dx_and_groups_by_lesion(tmp_path):
    # HAM10000 as published: image_id, lesion_id, dx (codes: mel = melanoma), no target, no patient_id.
    images = tmp_path / "images"
    rows = [("ISIC_0000001", "HAM_1", "mel"), ("ISIC_0000002", "HAM_1", "mel"), ("ISIC_0000003", "HAM_2", "nv"),
            ("ISIC_0000004", "HAM_3", "bkl")]
    for image_id, _, _ in rows:
        write_image(images / f"{image_id}.jpg")
    csv = tmp_path / "HAM10000_metadata.csv"
    pd.DataFrame(rows, columns=["image_id", "lesion_id", "dx"]).assign(dx_type="histo", age=50, sex="male",
                                                                        localization="back").to_csv(csv, index=False)
    dataset = read_dataset(None, csv, images)
    table = dataset.table.set_index("isic_id")
    assert table["target"].to_dict() == {"ISIC_0000001": 1, "ISIC_0000002": 1, "ISIC_0000003": 0, "ISIC_0000004": 0}
    # Two images of one lesion share a group, so the split keeps them in one part.
    assert table.loc["ISIC_0000001", "patient_id"] == table.loc["ISIC_0000002", "patient_id"]
    assert table["patient_id"].nunique() == 3
    assert "labels from column(s) dx" in dataset.labels_rule
    assert any("grouped by 'lesion_id'" in w for w in dataset.warnings)
