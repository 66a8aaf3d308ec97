"""Sharing a trained run: `export --format hf` (a folder huggingface_hub's mixin loads), api.load_run on that
folder, and the torch.hub entry point (hubconf.py)."""
import json
import re
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("huggingface_hub", reason="the hub extra (huggingface_hub) is not installed")

from melanoma_siamese.api import load_run  # noqa: E402
from melanoma_siamese.cli import main  # noqa: E402
from melanoma_siamese.export import sample_pixels  # noqa: E402
from melanoma_siamese.inference import Predictor, load_run as load_run_folder  # noqa: E402

from inference_run import image_files, private_copy, shared_run  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run(tiny_data, tmp_path_factory):
    return shared_run(tiny_data, tmp_path_factory)


@pytest.fixture(scope="module")
def shared(run, tmp_path_factory):
    out = tmp_path_factory.mktemp("hf") / "melanoma-siamese-tiny"
    assert main(["export", "--run", str(run), "--format", "hf", "--out", str(out)]) == 0
    return out


def test_the_folder_holds_weights_config_and_what_answers_rest_on(shared, run, capsys):
    names = {p.name for p in shared.iterdir()}
    assert {"config.json", "model.safetensors", "config.yaml", "threshold.json", "trust.json", "index.npz",
            "run.json", "README.md"} <= names
    config = json.loads((shared / "config.json").read_text())
    assert config["encoder"]["backbone"] == "resnet18" and config["image_size"] == 32
    info = json.loads((shared / "run.json").read_text())
    # Local paths of the data and the command line stay on this machine.
    assert "source" not in info and "command" not in info and info["parts"]["train"]["images"] > 0
    card = (shared / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: melanoma-siamese") and "generated images" in card
    assert json.loads((shared / "trust.json").read_text()) == json.loads((run / "trust.json").read_text())


def test_export_prints_the_check_and_the_push_command(run, tmp_path, capsys):
    assert main(["export", "--run", str(run), "--format", "hf", "--out", str(tmp_path / "x")]) == 0
    printed = capsys.readouterr().out
    assert f"huggingface-cli upload USER/NAME {tmp_path / 'x'}" in printed
    largest = float(re.search(r"largest absolute difference ([0-9.e+-]+)", printed).group(1))
    assert largest < 1e-5 and "8 training images" in printed and "limit 1e-05" in printed


def test_from_pretrained_predicts_as_the_run(shared, run):
    import torch

    from melanoma_siamese.hf import MelanomaSiamese

    model = MelanomaSiamese.from_pretrained(shared)
    assert not model.training
    loaded = load_run_folder(run)
    pixels, _ = sample_pixels(loaded, 6)
    emb, score = Predictor(loaded).score(pixels)
    with torch.no_grad():
        e, p = model(torch.from_numpy(pixels))
    assert np.abs(p.numpy() - score).max() < 1e-5 and np.abs(e.numpy() - emb).max() < 1e-5


def test_load_run_on_the_folder_answers_as_on_the_run(shared, run, tiny_data):
    paths = image_files(tiny_data)[:5]
    a, b = load_run(run).predict(paths), load_run(shared).predict(paths)
    for x, y in zip(a, b):
        for key in ("probability", "threshold", "score", "knn_probability"):
            assert x[key] == pytest.approx(y[key], abs=1e-6), key
        assert x["decision"] == y["decision"] and x["unfamiliar"]["flag"] == y["unfamiliar"]["flag"]
        assert x["calibrated"] and y["calibrated"] and x["prevalence"] == y["prevalence"]
        assert [s["id"] for s in x["similar"]] == [s["id"] for s in y["similar"]]


def test_the_run_model_card_is_the_hub_readme(run, tmp_path):
    own = private_copy(run, tmp_path)
    (own / "MODEL_CARD.md").write_text("# Model card of this run\n\nMeasured numbers.\n")
    assert main(["export", "--run", str(own), "--format", "hf", "--out", str(tmp_path / "card")]) == 0
    card = (tmp_path / "card" / "README.md").read_text()
    assert card.startswith("---\n") and card.endswith("# Model card of this run\n\nMeasured numbers.\n")


def test_the_shared_card_names_no_local_path(run, tmp_path, tiny_data):
    own = private_copy(run, tmp_path)
    (own / "MODEL_CARD.md").write_text(f"Data: --data {tiny_data}\nRun: {own}/models\n")
    assert main(["export", "--run", str(own), "--format", "hf", "--out", str(tmp_path / "card")]) == 0
    card = (tmp_path / "card" / "README.md").read_text()
    assert str(tiny_data) not in card and str(own) not in card
    assert f"Data: --data {tiny_data.name}\nRun: {own.name}/models\n" in card


def test_torch_hub_loads_a_run_and_a_shared_folder(run, shared, tiny_data):
    import torch

    paths = image_files(tiny_data)[:2]
    expected = load_run(run).predict(paths)
    for folder in (run, shared):
        model = torch.hub.load(str(ROOT), "melanoma_siamese", run=str(folder), source="local")
        got = model.predict(paths)
        assert [g["probability"] for g in got] == pytest.approx([e["probability"] for e in expected], abs=1e-6)
        assert model.nearest(paths, k=2)[0][0]["id"] == expected[0]["similar"][0]["id"]
