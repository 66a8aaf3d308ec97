"""End to end through the command line, on tiny generated data."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn import metrics as skm

from melanoma_siamese.cli import main

from helpers import kaggle_dataset, set_args

# Each trains tiny runs end to end (tens of seconds on 2 cores).
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained_run(tiny_data, tmp_path_factory):
    run = tmp_path_factory.mktemp("run") / "r"
    assert main(["train", "--data", str(tiny_data), "--out", str(run), "--seed", "0", *set_args()]) == 0
    return run


def test_run_folder_contents(trained_run):
    for name in ["models/siamese.pth", "models/classifier.pth", "config.yaml", "split.csv", "run.json",
                 "history_siamese.jsonl", "history_classifier.jsonl", "predictions.csv", "metrics.json",
                 "threshold.json", "index.npz", "images/siamese_loss.png", "images/classifier_loss.png",
                 "images/confusion_matrix.png", "images/input_sample.png", "images/roc_curve.png",
                 "images/pr_curve.png", "images/embedding_map.png", "images/distance_hist.png",
                 "images/reliability.png", "images/val_metrics.png"]:
        assert (trained_run / name).is_file(), name
    info = json.loads((trained_run / "run.json").read_text())
    assert info["device"] == "cpu" and "torch" in info["versions"]
    history = [json.loads(line) for line in (trained_run / "history_siamese.jsonl").read_text().splitlines()]
    assert history[0]["epoch"] == 0 and "knn_auc" in history[1] and "mined" in history[1]


def test_split_never_shares_a_patient(trained_run):
    split = pd.read_csv(trained_run / "split.csv")
    assert (split.groupby("patient_id")["part"].nunique() == 1).all()
    assert set(split["part"]) == {"train", "val", "test"}


def test_metrics_equal_sklearn_recomputation(trained_run):
    metrics = json.loads((trained_run / "metrics.json").read_text())
    pred = pd.read_csv(trained_run / "predictions.csv")
    assert set(pred.columns) >= {"isic_id", "patient_id", "label", "prob_melanoma", "knn_prob_melanoma", "part"}
    test, val = pred[pred["part"] == "test"], pred[pred["part"] == "val"]
    y, p = test["label"], test["prob_melanoma"]
    t = metrics["threshold"]["classifier"]
    assert metrics["test"]["roc_auc"] == pytest.approx(skm.roc_auc_score(y, p))
    assert metrics["test"]["average_precision"] == pytest.approx(skm.average_precision_score(y, p))
    assert metrics["test"]["accuracy"] == pytest.approx(skm.accuracy_score(y, p >= t))
    assert metrics["test"]["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, p >= t))
    assert metrics["test"]["confusion_matrix"] == skm.confusion_matrix(y, p >= t).tolist()
    assert metrics["test_at_0.5"]["accuracy"] == pytest.approx(skm.accuracy_score(y, p >= 0.5))
    assert metrics["knn"]["test"]["roc_auc"] == pytest.approx(skm.roc_auc_score(y, test["knn_prob_melanoma"]))
    # The threshold applied on test is the one chosen on validation (Youden's J).
    fpr, tpr, thr = skm.roc_curve(val["label"], val["prob_melanoma"])
    assert t == pytest.approx(min(1.0, thr[np.argmax(tpr - fpr)]))
    bal = metrics["test_balanced"]
    assert bal["n_melanoma"] * 2 == bal["n"]


def test_evaluate_reproduces_and_scores_other_data(trained_run, tmp_path, capsys):
    trained_run = Path(shutil.copytree(trained_run, tmp_path / "run"))  # evaluate rewrites the run's files
    before = json.loads((trained_run / "metrics.json").read_text())
    capsys.readouterr()
    assert main(["evaluate", "--run", str(trained_run), "--no-progress"]) == 0
    after = json.loads((trained_run / "metrics.json").read_text())
    assert after["test"]["roc_auc"] == pytest.approx(before["test"]["roc_auc"])
    # The threshold evaluate prints is on the raw score; it says so, and what it is on predict's scale.
    printed, t = capsys.readouterr().out, after["threshold"]["classifier"]
    cal = after.get("calibration")
    scale = (f"threshold {t:.4f} on the raw score (= {cal['threshold_shown']:.4f} as the probability predict shows"
             if cal else f"threshold {t:.4f} (raw score, as shown by predict")
    assert printed.count(scale) >= 3, printed  # natural test, balanced test, groups
    other = kaggle_dataset(tmp_path / "other", n=24)
    assert main(["evaluate", "--run", str(trained_run), "--data", str(other), "--no-progress"]) == 0
    external = trained_run / "external" / "other"
    pred = pd.read_csv(external / "predictions.csv")
    assert len(pred) == 24 and (pred["part"] == "external").all() and pred["run_part"].isna().all()
    assert json.loads((external / "metrics.json").read_text())["test"]["n"] == 24
    card = (external / "MODEL_CARD.md").read_text()
    assert "evaluated on external data other" in card and f"--data {other.resolve()}" in card
    assert f"melanoma-siamese evaluate --run {trained_run} --data {other.resolve()}" in card
    assert "External data other, natural prevalence (classifier)" in capsys.readouterr().out
    assert "none of them is in the run's split" in card and "WARNING" not in card


def test_external_data_holding_the_runs_own_images_says_so(trained_run, tiny_data, tmp_path, capsys):
    trained_run = Path(shutil.copytree(trained_run, tmp_path / "run"))
    split = pd.read_csv(trained_run / "split.csv")
    capsys.readouterr()
    assert main(["evaluate", "--run", str(trained_run), "--data", str(tiny_data), "--no-progress"]) == 0
    external = trained_run / "external" / tiny_data.name
    overlap = json.loads((external / "metrics.json").read_text())["overlap_with_run"]
    counts = split["part"].value_counts()
    assert overlap["images"] == {part: int(counts.get(part, 0)) for part in ("train", "val", "test")}
    assert overlap["unseen_images"] == counts["test"]  # the run's test part is not trained or tuned on
    printed = capsys.readouterr().out
    assert f"WARNING: {counts['train'] + counts['val']} of these images are the run's own" in printed
    card = (external / "MODEL_CARD.md").read_text()
    assert "numbers on all of them overstate" in card and "neither trained nor tuned on them" not in card
    pred = pd.read_csv(external / "predictions.csv", keep_default_na=False)
    assert sorted(pred["run_part"].unique()) == sorted(split["part"].unique())


def test_same_seed_same_split_and_metrics(trained_run, tiny_data, tmp_path):
    again = tmp_path / "again"
    assert main(["train", "--data", str(tiny_data), "--out", str(again), "--seed", "0", *set_args()]) == 0
    assert (again / "split.csv").read_text() == (trained_run / "split.csv").read_text()
    a = pd.read_csv(trained_run / "predictions.csv")
    b = pd.read_csv(again / "predictions.csv")
    assert np.allclose(a["prob_melanoma"], b["prob_melanoma"], atol=1e-6)


def test_stage_classifier_reuses_encoder_and_split(trained_run, tiny_data, tmp_path):
    run = tmp_path / "copy"
    shutil.copytree(trained_run, run)
    split = (run / "split.csv").read_text()
    encoder = (run / "models" / "siamese.pth").read_bytes()
    assert main(["train", "--data", str(tiny_data), "--out", str(run), "--stage", "classifier", "--seed", "5",
                 *set_args()]) == 0
    assert (run / "split.csv").read_text() == split
    assert (run / "models" / "siamese.pth").read_bytes() == encoder


def test_module_entry_point_and_console_script():
    out = subprocess.run([sys.executable, "-m", "melanoma_siamese", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "train" in out.stdout and "compare" in out.stdout
    script = shutil.which("melanoma-siamese") or str(Path(sys.executable).parent / "melanoma-siamese")
    out = subprocess.run([script, "train", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--skip-bad-images" in out.stdout


def test_device_is_printed(trained_run, tmp_path, capsys):
    trained_run = Path(shutil.copytree(trained_run, tmp_path / "run"))
    main(["evaluate", "--run", str(trained_run), "--no-progress", "--set", "evaluation.bootstrap=0"])
    assert "Device: cpu" in capsys.readouterr().out
