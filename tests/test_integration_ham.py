"""Real dermoscopic images: validate and train briefly on the shared HAM10000 sample."""
import json

import pytest

from melanoma_siamese.cli import main

from helpers import HAM


@pytest.mark.slow
def test_trains_on_real_images_and_beats_untrained_encoder(tmp_path):
    if not (HAM / "train-metadata.csv").is_file():
        pytest.skip(f"the shared real sample is absent ({HAM}); this test needs ../shared/data/ham10000-sample")
    run = tmp_path / "ham"
    overrides = ["model.backbone=resnet18", "model.pretrained=none", "data.image_size=64", "siamese.epochs=3",
                 "siamese.batch_size=64", "siamese.lr=0.001", "siamese.backbone_lr_scale=1", "classifier.epochs=20",
                 "evaluation.bootstrap=100", "runtime.progress=false", "siamese.val_reference_max=0"]
    args = ["train", "--data", str(HAM), "--out", str(run), "--config", "default"]
    for item in overrides:
        args += ["--set", item]
    assert main(args) == 0
    history = [json.loads(line) for line in (run / "history_siamese.jsonl").read_text().splitlines()]
    untrained, best = history[0]["knn_auc"], max(h["knn_auc"] for h in history[1:])
    assert best > untrained, (untrained, best)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["test"]["n"] == 400 and metrics["test"]["roc_auc"] > 0.7
