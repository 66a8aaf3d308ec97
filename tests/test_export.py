"""ONNX export of encoder + classifier, its check against PyTorch, and predict's onnxruntime engine."""
import re
import shutil

import numpy as np
import pandas as pd
import pytest

from melanoma_siamese.cli import main
from melanoma_siamese.export import sample_pixels
from melanoma_siamese.inference import Predictor, load_run
from melanoma_siamese.runfolder import RunFolder

from inference_run import image_files, private_copy, shared_run


@pytest.fixture(scope="module")
def exported(tiny_data, tmp_path_factory):
    # Export writes into the run: a copy, so the other modules' tests see the shared run as trained.
    run = private_copy(shared_run(tiny_data, tmp_path_factory), tmp_path_factory.mktemp("exported"))
    assert main(["export", "--run", str(run), "--format", "onnx"]) == 0
    return run


def test_export_writes_a_valid_model_and_prints_the_difference(tiny_data, tmp_path_factory, capsys):
    import onnx

    run = shared_run(tiny_data, tmp_path_factory)
    out = tmp_path_factory.mktemp("onnx") / "m.onnx"
    assert main(["export", "--run", str(run), "--format", "onnx", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    largest = float(re.search(r"largest absolute difference ([0-9.e+-]+)", printed).group(1))
    assert largest < 1e-4 and "8 training images" in printed
    model = onnx.load(str(out))
    onnx.checker.check_model(model)
    assert [i.name for i in model.graph.input] == ["images"]
    # The second output is the raw score, not the probability predict shows: named so, with what reads it.
    assert [o.name for o in model.graph.output] == ["embedding", "score"]
    assert "not a probability: melanoma where score >= " in printed


def test_onnx_metadata_turns_the_score_into_predicts_answer(exported):
    import json

    import onnxruntime
    from scipy.special import expit, logit

    run = load_run(exported, "cpu")
    session = onnxruntime.InferenceSession(str(RunFolder(exported).onnx), providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    assert "not a probability" in meta["score"] and int(meta["image_size"]) == run.config.data.image_size
    threshold, cal = float(meta["score_threshold"]), json.loads(meta["calibration"])
    assert threshold == run.thresholds.classifier
    pixels, _ = sample_pixels(run, 4)
    _, score = session.run(None, {"images": pixels})
    for prevalence in (None, 0.02):
        shown = Predictor(run, prevalence=prevalence).describe(pixels, Predictor(run).score(pixels), 1)
        p = float(meta["prevalence"]) if prevalence is None else prevalence
        shift = logit(p) - logit(cal["prevalence"])
        by_hand = expit(cal["slope"] * logit(score.astype(np.float64)) + cal["intercept"] + shift)
        assert [a["probability"] for a in shown] == pytest.approx(by_hand, abs=1e-5)
        assert [a["decision"] == "melanoma" for a in shown] == list(score >= threshold)


def test_onnx_takes_uint8_batches_of_any_size_and_matches_torch(exported):
    run = load_run(exported, "cpu")
    pixels, _ = sample_pixels(run, 5)
    score = Predictor(run, "onnxruntime").score
    assert RunFolder(exported).onnx.is_file()
    torch_emb, torch_prob = Predictor(run).score(pixels)
    for batch in (pixels[:1], pixels):
        emb, prob = score(batch)
        assert emb.shape == (len(batch), 512) and prob.shape == (len(batch),)
        assert np.abs(prob - torch_prob[:len(batch)]).max() < 1e-4
        assert np.abs(emb - torch_emb[:len(batch)]).max() < 1e-4
        assert np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)


def test_predict_with_onnxruntime_equals_torch(exported, tiny_data, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for p in image_files(tiny_data)[:6]:
        shutil.copy(p, folder)
    # An image unlike the training images: both engines must say so (the ONNX model outputs the embedding).
    from PIL import Image
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / "z.png")
    for engine in ("torch", "onnxruntime"):
        assert main(["predict", "--run", str(exported), str(folder), "--engine", engine, "--csv",
                     str(tmp_path / f"{engine}.csv")]) == 0
    a, b = pd.read_csv(tmp_path / "torch.csv"), pd.read_csv(tmp_path / "onnxruntime.csv")
    assert np.abs(a["probability"] - b["probability"]).max() < 1e-4
    assert np.abs(a["knn_probability"] - b["knn_probability"]).max() < 1e-4
    assert (a["decision"] == b["decision"]).all() and (a["neighbour_1_id"] == b["neighbour_1_id"]).all()
    assert (a["unfamiliar"] == b["unfamiliar"]).all() and a["unfamiliar"].iloc[-1]
    assert np.abs(a["unfamiliar_distance"] - b["unfamiliar_distance"]).max() < 1e-4


def test_onnxruntime_engine_without_an_export_says_how(tiny_data, tmp_path_factory, tmp_path, capsys):
    run = shared_run(tiny_data, tmp_path_factory)
    missing = tmp_path / "none.onnx"
    assert main(["predict", "--run", str(run), str(image_files(tiny_data)[0]), "--engine", "onnxruntime",
                 "--onnx", str(missing)]) == 2
    assert "melanoma-siamese export" in capsys.readouterr().err
