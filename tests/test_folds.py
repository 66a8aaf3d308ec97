"""K-fold ensembles: patient-grouped folds, the averaged model, out-of-fold predictions, resume per member."""
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from melanoma_siamese.checkpoint import load_model, save_model
from melanoma_siamese.config import ConfigError, load_config
from melanoma_siamese.errors import DataError
from melanoma_siamese.folds import assign_folds, run_training
from melanoma_siamese.hooks import Hooks
from melanoma_siamese.models import Classifier, Encoder, EnsembleClassifier, EnsembleEncoder
from melanoma_siamese.runfolder import RunFolder
from melanoma_siamese.train import DataSource

from helpers import TINY


def _table(patients: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(patients):
        melanoma = p % 4 == 0
        for i in range(int(rng.integers(1, 4))):
            rows.append({"isic_id": f"I{p}_{i}", "patient_id": f"P{p}", "target": int(melanoma and i == 0)})
    return pd.DataFrame(rows)


def test_folds_keep_patients_together_and_hold_both_classes():
    table = _table(60)
    folds = assign_folds(table, 5, seed=0, where="meta.csv")
    assert sorted(set(folds)) == [0, 1, 2, 3, 4]
    assert table.assign(fold=folds).groupby("patient_id")["fold"].nunique().max() == 1
    shares = table.assign(fold=folds).groupby("fold")["target"].mean()
    assert shares.min() > 0 and shares.max() - shares.min() < 0.15
    assert np.array_equal(folds, assign_folds(table, 5, seed=0, where="meta.csv"))
    assert not np.array_equal(folds, assign_folds(table, 5, seed=1, where="meta.csv"))


def test_too_few_melanoma_patients_for_the_folds_is_named():
    table = _table(12)  # 3 melanoma patients
    with pytest.raises(DataError, match=r"data.folds=4: the training part has 3 patient\(s\) with melanoma"):
        assign_folds(table, 4, seed=0, where="meta.csv")


def test_one_fold_is_refused():
    with pytest.raises(ConfigError, match="data.folds: 1"):
        load_config(None, ["data.folds=1"])


def test_ensemble_averages_members_and_survives_a_checkpoint(tmp_path):
    torch.manual_seed(0)
    encoders = [Encoder("resnet18", "none", 16).eval() for _ in range(3)]
    classifiers = [Classifier(16, features=("image", "clinical")).eval() for _ in range(3)]
    encoder, classifier = EnsembleEncoder(encoders).eval(), EnsembleClassifier(classifiers).eval()
    images = torch.rand(4, 3, 32, 32)
    extra = torch.rand(4, classifiers[0].net[0].in_features - 16)
    with torch.no_grad():
        emb = encoder(images)
        members = [e(images) for e in encoders]
        assert torch.allclose(emb.norm(dim=1), torch.ones(4), atol=1e-6)
        # Cosine similarity in the ensemble's space is the mean of the members'.
        assert torch.allclose(emb @ emb.T, torch.stack([m @ m.T for m in members]).mean(0), atol=1e-6)
        probs = torch.softmax(classifier(torch.cat([emb, extra], 1)), 1)[:, 1]
        expected = torch.stack([torch.softmax(c(torch.cat([m, extra], 1)), 1)[:, 1]
                                for c, m in zip(classifiers, members)]).mean(0)
        assert torch.allclose(probs, expected, atol=1e-6)
    save_model(encoder, tmp_path / "s.pth")
    save_model(classifier, tmp_path / "c.pth")
    encoder2, classifier2 = load_model(tmp_path / "s.pth", "siamese")[0], load_model(tmp_path / "c.pth", "classifier")[0]
    assert isinstance(encoder2, EnsembleEncoder) and len(encoder2.members) == 3
    with torch.no_grad():
        assert torch.equal(encoder2(images), emb)
        assert torch.equal(classifier2(torch.cat([emb, extra], 1)), classifier(torch.cat([emb, extra], 1)))


class _Crash(Exception):
    pass


def _crash_in_second_member(epoch: int, batch: int):
    seen = []

    def hook(at_epoch: int, index: int) -> None:
        if (at_epoch, index) == (epoch, batch):
            seen.append(1)
            if len(seen) == 2:  # the first member passed this point already: this is the second
                raise _Crash()
    return hook


@pytest.fixture(scope="module")
def ensemble_run(tiny_data, tmp_path_factory):
    """A 2-fold ensemble whose second member was interrupted in its second epoch, then resumed."""
    run = tmp_path_factory.mktemp("folds") / "run"
    config = load_config(None, [*TINY, "data.folds=2", "siamese.epochs=2"])
    lines: list[str] = []
    with pytest.raises(_Crash):
        run_training(config, DataSource(data=tiny_data), run, log=lines.append,
                     hooks=Hooks(on_batch=_crash_in_second_member(2, 1)))
    first_state = RunFolder(run).fold(0).state().read_bytes()
    resumed: list[str] = []
    metrics = run_training(config, DataSource(data=tiny_data), run, log=resumed.append, resume=True, hooks=Hooks())
    return RunFolder(run), metrics, resumed, first_state


@pytest.mark.slow
def test_resume_continues_the_interrupted_member_only(ensemble_run):
    run, metrics, log, first_state = ensemble_run
    text = "\n".join(log)
    assert "[Siamese] resumed after epoch 2" in text and "[Siamese] resumed after epoch 1" in text
    assert run.fold(0).state().read_bytes() == first_state  # the finished member was not trained again
    assert metrics["test"]["roc_auc"] > 0


@pytest.mark.slow
def test_members_out_of_fold_and_the_ensemble(ensemble_run):
    run, metrics, _, _ = ensemble_run
    split = pd.read_csv(run.split, dtype={"isic_id": str})
    train_ids = set(split.loc[split["part"] == "train", "isic_id"])
    oof = pd.read_csv(run.oof, dtype={"isic_id": str})
    assert set(oof["isic_id"]) == train_ids and oof["isic_id"].is_unique  # each scored once, by the member
    for fold in (0, 1):                                                  # that did not train on it
        member = pd.read_csv(run.fold(fold).split, dtype={"isic_id": str})
        held = set(oof.loc[oof["fold"] == fold, "isic_id"])
        assert held == set(member.loc[member["part"] == "val", "isic_id"])
        assert not held & set(member.loc[member["part"] == "train", "isic_id"])
        assert set(member.loc[member["part"] == "test", "isic_id"]) == set(split.loc[split["part"] == "test", "isic_id"])
    # The ensemble's test score is the mean of its members' (each member's predictions.csv, raw scores).
    scores = [pd.read_csv(run.fold(f).predictions, dtype={"isic_id": str}).query("part == 'test'")
              .set_index("isic_id")["prob_melanoma"] for f in (0, 1)]
    ours = pd.read_csv(run.predictions, dtype={"isic_id": str}).query("part == 'test'").set_index("isic_id")
    assert np.allclose(ours["prob_melanoma"], ((scores[0] + scores[1]) / 2).loc[ours.index], atol=1e-5)
    baselines = [run.fold(f).read_baseline() for f in (0, 1)]
    assert metrics["baseline"]["backbone_image_passes"] == sum(b["backbone_image_passes"] for b in baselines)
    assert metrics["folds"]["k"] == 2 and 0 <= metrics["folds"]["out_of_fold"]["roc_auc"] <= 1
    assert len(load_model(run.siamese, "siamese")[0].members) == 2


@pytest.mark.slow
def test_the_ensemble_exports_to_one_onnx_file_and_predicts(ensemble_run, tiny_data, tmp_path):
    run = ensemble_run[0]
    out = tmp_path / "ensemble.onnx"
    done = subprocess.run([sys.executable, "-m", "melanoma_siamese", "export", "--run", str(run.root), "--format",
                           "onnx", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "largest absolute difference" in done.stdout and out.is_file()
    image = sorted((tiny_data / "train-image" / "image").glob("*.jpg"))[0]
    rows = []
    for engine in ("torch", "onnxruntime"):
        csv = tmp_path / f"{engine}.csv"
        done = subprocess.run([sys.executable, "-m", "melanoma_siamese", "predict", "--run", str(run.root),
                               "--engine", engine, "--onnx", str(out), "--csv", str(csv), "--no-progress",
                               str(image)], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        rows.append(pd.read_csv(csv).iloc[0])
    assert rows[0]["score"] == pytest.approx(rows[1]["score"], abs=1e-4)
    assert rows[0]["neighbour_1_id"] == rows[1]["neighbour_1_id"]


@pytest.mark.slow
def test_the_server_answers_with_the_ensemble(ensemble_run, tiny_data):
    from fastapi.testclient import TestClient

    from melanoma_siamese.serve import create_app

    run = ensemble_run[0]
    image = sorted((tiny_data / "train-image" / "image").glob("*.jpg"))[0]
    with TestClient(create_app(run.root)) as client:
        assert client.get("/api/health").json()["models"] == 2
        answer = client.post("/api/predict", files={"file": (image.name, image.read_bytes(), "image/jpeg")})
        assert answer.status_code == 200, answer.text
        assert 0 <= answer.json()["probability"] <= 1 and answer.json()["similar"]
