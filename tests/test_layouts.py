"""Each dataset layout as its official download lays it out, read end to end through read_dataset."""
import io
import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from melanoma_siamese.data.layouts import LAYOUTS
from melanoma_siamese.data.metadata import DataError, detect_layout, read_dataset
from melanoma_siamese.data.split import patient_split

from helpers import set_args

ISIC2018_CLASSES = ("MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC")
ISIC2019_CLASSES = ("MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK")


def _jpeg(seed: int, size: int = 24) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()


def _lesions(lesions: int, per_lesion: int = 2, melanoma_every: int = 3):
    """(image id, lesion id, melanoma?) rows: several images per lesion, enough lesions of each class to split."""
    return [(f"ISIC_{lesion * per_lesion + k:07d}", f"L_{lesion:04d}", lesion % melanoma_every == 0)
            for lesion in range(lesions) for k in range(per_lesion)]


def make_ham10000(root, lesions=4, metadata_name="HAM10000_metadata.csv"):
    rows = _lesions(lesions)
    for n, (image_id, _, _) in enumerate(rows):
        part = root / f"HAM10000_images_part_{1 + n % 2}"
        part.mkdir(parents=True, exist_ok=True)
        (part / f"{image_id}.jpg").write_bytes(_jpeg(n))
    pd.DataFrame({"lesion_id": [lesion for _, lesion, _ in rows], "image_id": [i for i, _, _ in rows],
                  "dx": ["mel" if mel else "nv" for _, _, mel in rows], "dx_type": "histo",
                  "age": [45.0] * (len(rows) - 1) + [None], "sex": "female",
                  "localization": "back"}).to_csv(root / metadata_name, index=False,
                                                  sep="\t" if metadata_name.endswith(".tab") else ",")
    return root


def make_isic2018(root, lesions=4, part="Training", groupings=True, csv_in_folder=False):
    rows = _lesions(lesions)
    images = root / f"ISIC2018_Task3_{part}_Input"
    images.mkdir(parents=True)
    for n, (image_id, _, _) in enumerate(rows):
        (images / f"{image_id}.jpg").write_bytes(_jpeg(n))
    one_hot = [{"image": i, **{c: float(c == ("MEL" if mel else "NV")) for c in ISIC2018_CLASSES}} for i, _, mel in rows]
    folder = root / f"ISIC2018_Task3_{part}_GroundTruth" if csv_in_folder else root
    folder.mkdir(exist_ok=True)
    pd.DataFrame(one_hot).to_csv(folder / f"ISIC2018_Task3_{part}_GroundTruth.csv", index=False)
    if groupings:
        pd.DataFrame({"image": [i for i, _, _ in rows], "lesion_id": [lesion for _, lesion, _ in rows],
                      "diagnosis_confirm_type": "histopathology"}).to_csv(
            root / f"ISIC2018_Task3_{part}_LesionGroupings.csv", index=False)
    return root


def make_isic2019(root, lesions=4):
    """Ids as the ISIC 2019 CSVs write them: some `_downsampled` in the CSV whose file is named either way."""
    rows = _lesions(lesions)
    images = root / "ISIC_2019_Training_Input"
    images.mkdir(parents=True)
    csv_ids = []
    for n, (image_id, _, _) in enumerate(rows):
        # Row 0: CSV and file both say _downsampled; row 1: only the CSV does; row 2: only the file does.
        csv_id = image_id + "_downsampled" if n in (0, 1) else image_id
        file_id = image_id + "_downsampled" if n in (0, 2) else image_id
        (images / f"{file_id}.jpg").write_bytes(_jpeg(n))
        csv_ids.append(csv_id)
    one_hot = [{"image": i, **{c: float(c == ("MEL" if mel else "BCC")) for c in ISIC2019_CLASSES}}
               for i, (_, _, mel) in zip(csv_ids, rows)]
    pd.DataFrame(one_hot).to_csv(root / "ISIC_2019_Training_GroundTruth.csv", index=False)
    pd.DataFrame({"image": csv_ids, "age_approx": 55.0, "anatom_site_general": "anterior torso",
                  "lesion_id": [lesion for _, lesion, _ in rows], "sex": "male"}).to_csv(
        root / "ISIC_2019_Training_Metadata.csv", index=False)
    return root


def make_isic2024(root, patients=4):
    import h5py

    root.mkdir(parents=True, exist_ok=True)
    rows = []
    with h5py.File(root / "train-image.hdf5", "w") as handle:
        for n in range(patients * 2):
            isic_id = f"ISIC_{9000000 + n}"
            handle.create_dataset(isic_id, data=np.bytes_(_jpeg(n)))  # as Kaggle's file: one bytes scalar per id
            melanoma, carcinoma = n % 4 == 0, n % 4 == 1
            rows.append({"isic_id": isic_id, "target": int(melanoma or carcinoma), "patient_id": f"IP_{n // 2}",
                         "age_approx": 60.0, "sex": "male", "anatom_site_general": "posterior torso",
                         "image_type": "TBP tile: close-up",
                         "iddx_2": "Malignant melanocytic proliferations (Melanoma)" if melanoma else
                         "Malignant epidermal proliferations" if carcinoma else "Benign melanocytic proliferations",
                         "iddx_3": "" if melanoma else "Basal cell carcinoma" if carcinoma else "Nevus"})
    pd.DataFrame(rows).to_csv(root / "train-metadata.csv", index=False)
    return root


def make_isic_cli(root):
    root.mkdir(parents=True, exist_ok=True)
    rows = [("ISIC_0000001", "dermoscopic", "Malignant melanocytic proliferations (Melanoma)", "Melanoma Invasive"),
            ("ISIC_0000002", "dermoscopic", "Malignant melanocytic proliferations (Melanoma)", ""),
            ("ISIC_0000003", "dermoscopic", "Benign melanocytic proliferations", "Nevus"),
            ("ISIC_0000004", "clinical: close-up", "Benign melanocytic proliferations", "Nevus"),
            ("ISIC_0000005", "clinical: overview", "Benign melanocytic proliferations", "Nevus"),
            ("ISIC_0000006", "TBP tile: close-up", "Malignant melanocytic proliferations (Melanoma)", "")]
    for n, (image_id, *_) in enumerate(rows):
        (root / f"{image_id}.jpg").write_bytes(_jpeg(n))
    pd.DataFrame(rows, columns=["isic_id", "image_type", "diagnosis_2", "diagnosis_3"]).assign(
        diagnosis_1=["Malignant", "Malignant", "Benign", "Benign", "Benign", "Malignant"],
        patient_id=["IP_1", "IP_1", "IP_2", "IP_3", "IP_3", "IP_4"], fitzpatrick_skin_type="III",
        anatom_site_general="palms/soles").to_csv(root / "metadata.csv", index=False)
    return root


def _by_id(dataset):
    return dataset.table.set_index("isic_id")


@pytest.mark.parametrize("metadata_name", ["HAM10000_metadata.csv", "HAM10000_metadata", "HAM10000_metadata.tab"])
def test_ham10000_as_published(tmp_path, metadata_name):
    dataset = read_dataset(make_ham10000(tmp_path, metadata_name=metadata_name))
    table = _by_id(dataset)
    assert dataset.layout == "ham10000" and not dataset.problems
    assert (table["path"] != "").all()
    assert {"HAM10000_images_part_1", "HAM10000_images_part_2"} == {p.split("/")[-2] for p in table["path"]}
    assert table["target"].tolist() == [1, 1, 0, 0, 0, 0, 1, 1]
    assert table.loc["ISIC_0000000", "patient_id"] == table.loc["ISIC_0000001", "patient_id"] == "lesion:L_0000"
    assert "labels from column(s) dx" in dataset.labels_rule and "'mel'" in dataset.labels_rule
    assert table["age"].isna().sum() == 1 and set(table["sex"]) == {"female"} and set(table["site"]) == {"torso"}


@pytest.mark.parametrize("part, csv_in_folder", [("Training", False), ("Validation", True)])
def test_isic2018_task3(tmp_path, part, csv_in_folder):
    dataset = read_dataset(make_isic2018(tmp_path, part=part, csv_in_folder=csv_in_folder))
    table = _by_id(dataset)
    assert dataset.layout == "isic-2018-task3" and not dataset.problems
    assert table["target"].tolist() == [1, 1, 0, 0, 0, 0, 1, 1]
    assert "one-hot column 'MEL'" in dataset.labels_rule and "4 of 8 melanoma" in dataset.labels_rule
    assert table.loc["ISIC_0000002", "patient_id"] == table.loc["ISIC_0000003", "patient_id"] == "lesion:L_0001"


def test_isic2018_without_groupings_is_one_image_per_group_with_a_warning(tmp_path):
    dataset = read_dataset(make_isic2018(tmp_path, groupings=False))
    assert dataset.table["patient_id"].nunique() == len(dataset.table)
    assert any("no 'patient_id' or 'lesion_id' column" in w for w in dataset.warnings)


def test_isic2018_row_with_two_classes_is_a_problem(tmp_path):
    make_isic2018(tmp_path)
    truth = tmp_path / "ISIC2018_Task3_Training_GroundTruth.csv"
    frame = pd.read_csv(truth)
    frame.loc[2, "BKL"] = 1.0
    frame.to_csv(truth, index=False)
    problems = [str(p) for p in read_dataset(tmp_path).problems]
    assert any("ISIC_0000002" in p and "exactly one 1" in p for p in problems)


def test_isic2019_downsampled_names_match_both_ways(tmp_path):
    dataset = read_dataset(make_isic2019(tmp_path))
    table = _by_id(dataset)
    assert dataset.layout == "isic-2019" and not dataset.problems
    assert table.loc["ISIC_0000000_downsampled", "path"].endswith("ISIC_0000000_downsampled.jpg")
    assert table.loc["ISIC_0000001_downsampled", "path"].endswith("ISIC_0000001.jpg")
    assert table.loc["ISIC_0000002", "path"].endswith("ISIC_0000002_downsampled.jpg")
    assert table["target"].tolist() == [1, 1, 0, 0, 0, 0, 1, 1]
    assert table.loc["ISIC_0000003", "patient_id"] == "lesion:L_0001"
    assert set(table["site"]) == {"torso"} and set(table["sex"]) == {"male"} and (table["age"] == 55).all()


def test_isic2024_reads_images_from_the_hdf5_file(tmp_path):
    from melanoma_siamese.data.images import build_cache

    dataset = read_dataset(make_isic2024(tmp_path / "d"))
    table = _by_id(dataset)
    assert dataset.layout == "isic-2024" and not dataset.problems
    # target says malignant (the carcinoma too); the label is melanoma alone, from iddx_2/iddx_3.
    assert table["target"].tolist() == [1, 0, 0, 0, 1, 0, 0, 0]
    assert "target is 1 for any malignancy" in dataset.labels_rule
    assert table.loc["ISIC_9000003", "path"] == f"{tmp_path / 'd' / 'train-image.hdf5'}::ISIC_9000003"
    cache = build_cache(dataset.table["path"].tolist(), 16, tmp_path / "cache", workers=2)
    assert not cache.failures and cache.array.shape == (8, 16, 16, 3)
    expected = np.asarray(Image.open(io.BytesIO(_jpeg(3))).resize((16, 16), Image.BILINEAR))
    assert np.array_equal(cache.array[3], expected)
    assert not any(p.suffix == ".jpg" for p in (tmp_path / "d").rglob("*"))  # nothing unpacked


def test_isic2024_images_open_one_at_a_time_for_thumbnails_and_export(tmp_path):
    """A neighbour's thumbnail (serve) and export's sample images read an HDF5 member by its path too."""
    from melanoma_siamese.data.hdf5 import read_source
    from melanoma_siamese.inputs import read_image
    from melanoma_siamese.serve import thumbnail_png

    path = _by_id(read_dataset(make_isic2024(tmp_path / "d"))).loc["ISIC_9000003", "path"]
    assert read_source(path) == _jpeg(3)
    assert np.array_equal(read_image(read_source(path), 16), read_image(_jpeg(3), 16))
    assert Image.open(io.BytesIO(thumbnail_png(path))).format == "PNG"
    with pytest.raises(KeyError):
        read_source(path.replace("ISIC_9000003", "ISIC_0000000"))


def test_isic2024_without_h5py_says_how_to_install(tmp_path, monkeypatch):
    import sys

    data = make_isic2024(tmp_path / "d")
    monkeypatch.setitem(sys.modules, "h5py", None)
    with pytest.raises(DataError) as err:
        read_dataset(data)
    assert "train-image.hdf5" in str(err.value) and "pip install 'melanoma-siamese[isic2024]'" in str(err.value)


def test_isic_cli_dermoscopic_only_by_default_and_diagnosis_2(tmp_path):
    dataset = read_dataset(make_isic_cli(tmp_path))
    table = _by_id(dataset)
    assert dataset.layout == "isic-cli"
    assert list(table.index) == ["ISIC_0000001", "ISIC_0000002", "ISIC_0000003"]
    # diagnosis_2 naming melanoma with diagnosis_3 empty is a melanoma whose subtype was not recorded.
    assert table["target"].tolist() == [1, 1, 0]
    assert dataset.dropped_image_types == {"clinical: close-up": 1, "clinical: overview": 1, "TBP tile: close-up": 1}
    assert "diagnosis_2 naming melanoma with diagnosis_3 empty" in dataset.labels_rule
    assert set(table["skin_type"]) == {"III"} and set(table["site"]) == {"palms/soles"}


@pytest.mark.parametrize("image_types, kept", [("all", 6), ("dermoscopic,clinical", 5), ("clinical", 2)])
def test_isic_cli_image_types_option(tmp_path, image_types, kept):
    dataset = read_dataset(make_isic_cli(tmp_path), image_types=image_types)
    assert len(dataset.table) == kept


@pytest.mark.parametrize("make", [make_ham10000, make_isic2018, make_isic2019])
def test_images_of_one_lesion_never_straddle_parts(tmp_path, make):
    table = read_dataset(make(tmp_path, lesions=45)).table
    assert table.groupby("patient_id").size().eq(2).all()
    for seed in range(3):
        part = patient_split(table, 0.1, 0.2, seed)
        assert table.assign(part=part).groupby("patient_id")["part"].nunique().eq(1).all()


def test_patient_then_lesion_then_image(tmp_path):
    rows = [("a", "P1", "L1"), ("b", "", "L1"), ("c", "", "L2"), ("d", "", ""), ("e", "", "L2")]
    for image_id, _, _ in rows:
        (tmp_path / f"{image_id}.jpg").write_bytes(_jpeg(0))
    pd.DataFrame(rows, columns=["isic_id", "patient_id", "lesion_id"]).assign(target=0).to_csv(
        tmp_path / "metadata.csv", index=False)
    dataset = read_dataset(tmp_path)
    assert dataset.table["patient_id"].tolist() == ["P1", "lesion:L1", "lesion:L2", "single:d", "lesion:L2"]
    assert any("3 image(s) have no patient_id; grouped by their lesion_id" in w for w in dataset.warnings)


def test_bad_layout_lists_every_layout_looked_for(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DataError) as err:
        detect_layout(tmp_path)
    message = str(err.value)
    assert "notes.txt" in message
    for layout in LAYOUTS:
        assert layout.expects in message


@pytest.mark.slow
def test_train_on_isic2019_layout_end_to_end(tmp_path, capsys):
    from melanoma_siamese.cli import main

    data = make_isic2019(tmp_path / "d", lesions=45)
    run = tmp_path / "run"
    code = main(["train", "--data", str(data), "--out", str(run), *set_args(), "--set", "siamese.epochs=1",
                 "--set", "classifier.epochs=1"])
    out = capsys.readouterr().out
    assert code == 0
    assert "Labels: " in out and "one-hot column 'MEL'" in out and "30 of 90 melanoma" in out
    info = json.loads((run / "run.json").read_text())
    assert info["layout"] == "isic-2019" and "one-hot column 'MEL'" in info["labels"]
    split = pd.read_csv(run / "split.csv")
    assert split.groupby("patient_id")["part"].nunique().eq(1).all()
    assert set(split["site"]) == {"torso"} and set(split["sex"]) == {"male"}


def test_load_and_validate_announces_labels_and_kinds_left_out(tmp_path):
    from melanoma_siamese.config import DataConfig
    from melanoma_siamese.data.prepare import load_and_validate
    from melanoma_siamese.train import DataSource

    lines = []
    prepared = load_and_validate(DataSource(data=make_isic_cli(tmp_path / "d")),
                                 DataConfig(image_size=16, cache_dir=str(tmp_path / "cache")), 1, False, lines.append)
    assert len(prepared.table) == 3 and prepared.array.shape == (3, 16, 16, 3)
    assert any(line.startswith("Labels: ") and "metadata.csv: labels from column(s) diagnosis_3" in line
               for line in lines)
    assert ("Left out (data.image_types=dermoscopic): 1 'TBP tile: close-up', 1 'clinical: close-up', "
            "1 'clinical: overview'") in lines


def test_isic2024_image_missing_from_the_hdf5_file_is_named(tmp_path):
    data = make_isic2024(tmp_path / "d")
    metadata = pd.read_csv(data / "train-metadata.csv")
    metadata.loc[len(metadata)] = {**metadata.iloc[0].to_dict(), "isic_id": "ISIC_9999999"}
    metadata.to_csv(data / "train-metadata.csv", index=False)
    problems = [str(p) for p in read_dataset(data).problems]
    assert problems == [f"{data / 'train-image.hdf5'}, column 'isic_id', value 'ISIC_9999999': image listed in "
                        "train-metadata.csv is absent from train-image.hdf5; expected a dataset named ISIC_9999999"]


def test_real_sample_laid_out_as_ham10000_publishes_it(tmp_path):
    from helpers import HAM

    if not HAM.is_dir():
        pytest.skip(f"the real sample is absent ({HAM}); see its README")
    sample = pd.read_csv(HAM / "train-metadata.csv")
    for n, image_id in enumerate(sample["isic_id"]):
        part = tmp_path / f"HAM10000_images_part_{1 + n % 2}"
        part.mkdir(exist_ok=True)
        (part / f"{image_id}.jpg").symlink_to(HAM / "train-image" / "image" / f"{image_id}.jpg")
    # The sample's patient_id is HAM10000's lesion_id, its diagnosis the dx code.
    sample.rename(columns={"isic_id": "image_id", "patient_id": "lesion_id", "diagnosis": "dx", "age_approx": "age",
                           "anatom_site": "localization"}).drop(columns=["target"]).to_csv(
        tmp_path / "HAM10000_metadata.csv", index=False)
    dataset = read_dataset(tmp_path)
    table = dataset.table
    assert dataset.layout == "ham10000" and not dataset.problems
    assert int(table["target"].sum()) == 491 and (table["target"] == (sample["target"])).all()
    assert "491 of 2000 melanoma" in dataset.labels_rule
    assert int(table["age"].isna().sum()) == 12 and int((table["site"] == "").sum()) == 52


def test_isic_cli_image_type_that_matches_nothing_is_announced(tmp_path):
    dataset = read_dataset(make_isic_cli(tmp_path), image_types="dermoscopy")
    assert len(dataset.table) == 0
    assert any("data.image_types names 'dermoscopy', which starts no image_type here; found: 'dermoscopic' (3)" in w
               for w in dataset.warnings)
