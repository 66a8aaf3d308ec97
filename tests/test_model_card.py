"""The model card: every section present, numbers from the run's records, and written by evaluate."""
from __future__ import annotations

import json

import yaml

from melanoma_siamese.cli import main
from melanoma_siamese.config import load_config
from melanoma_siamese.model_card import LICENCES, STATED, licence, model_card
from melanoma_siamese.runfolder import RunFolder

from inference_run import private_copy, shared_run

INFO = {"source": {"data": "/data/isic2020-jpg-256"}, "layout": "kaggle-256", "git_commit": "abc123",
        "versions": {"torch": "2.5"}, "parts": {"train": {"images": 700, "melanoma": 14},
                                                "val": {"images": 100, "melanoma": 2},
                                                "test": {"images": 200, "melanoma": 9}}}
METRICS = {"threshold": {"classifier": 0.4321},
           "test": {"n": 200, "n_melanoma": 9, "roc_auc": 0.912, "roc_auc_ci": [0.85, 0.96], "sensitivity": 0.778,
                    "sensitivity_ci": [0.5, 1.0], "specificity": 0.8, "specificity_ci": [0.75, 0.85]},
           "calibration": {"method": "platt", "shown_at_prevalence": 0.02, "shown_prevalence_source": "training part",
                           "threshold_shown": 0.1234, "fitted_prevalence": 0.025,
                           "test": {"ece_before": 0.3, "ece_after": 0.05, "brier_before": 0.2, "brier_after": 0.04,
                                    "melanoma_share": 0.045}}}
GROUPS = {"min_melanoma": 5, "absent": ["skin type"], "groupings": {"sex": {
    "female": {"images": 120, "melanoma": 6, "too_few_to_say": False, "roc_auc": 0.93, "roc_auc_ci": [0.8, 0.99],
               "sensitivity": 0.83, "sensitivity_ci": [0.5, 1.0], "specificity": 0.81, "specificity_ci": [0.7, 0.9]},
    "male": {"images": 80, "melanoma": 3, "too_few_to_say": True, "note": "too few to say (3 melanoma; ...)",
             "roc_auc": None, "sensitivity": None, "specificity": None}}}}


def test_card_sections_and_numbers():
    text = model_card("runs/isic", load_config(), INFO, METRICS, GROUPS, None, generated=False)
    for heading in ("## Data", "## Split", "## Recipe and budget", "## Metrics (test part)", "## Calibration",
                    "## Results by group", "## Unfamiliar images", "## Intended use and limits", "## How to reproduce"):
        assert heading in text
    assert "Images: 1000, of which 25 melanoma (2.5%)" in text
    assert "| natural prevalence | 200 | 9 | 0.912 (95% CI 0.850-0.960) |" in text
    assert "ECE" not in text and "expected calibration error 0.300 -> 0.050, Brier 0.200 -> 0.040" in text
    # The figures are on the fitted prevalence's scale, said; 2% against 2.5% is near enough to need no warning.
    assert "measured at the prevalence the calibration was fitted at, 2.5% (the test part has 4.5% melanoma)" in text
    assert "not what these figures measure" not in text
    assert "| sex: male | 80 | 3 | too few to say" in text and "Not in the data: skin type." in text
    assert "not a medical device" in text and "CC BY-NC 4.0" in text
    assert "melanoma-siamese train --data /data/isic2020-jpg-256 --config runs/isic/config.yaml" in text
    assert "0.4321" in text and "abc123" in text
    assert f"Training seed: {load_config().runtime.seed} " in text
    assert "0.4321 on the classifier's raw score (the same cut as 0.1234 on the calibrated probability" in text


def test_card_warns_that_calibration_figures_are_not_on_a_stated_prevalence():
    cal = {**METRICS["calibration"], "fitted_prevalence": 0.245, "shown_at_prevalence": 0.02,
           "shown_prevalence_source": STATED}
    text = model_card("r", load_config(), INFO, {**METRICS, "calibration": cal}, GROUPS, None, generated=False)
    assert ("The probabilities shown at 2.00% are not what these figures measure: they are rescaled for a "
            "population with 2.00% melanoma, so on this data they read lower than its frequencies") in text


def test_card_says_which_epoch_the_run_kept():
    baseline = {"backbone_image_passes": 30912, "siamese_seconds": 305, "untrained_encoder_test_knn_auc": 0.8,
                "epochs_run": 23, "kept_epoch": 15, "monitor": "knn_auc", "kept_value": 0.8731}
    text = model_card("r", load_config(), INFO, METRICS, GROUPS, baseline, generated=False)
    assert "- Stage 1 ran 23 epoch(s) and kept the weights of epoch 15 (its knn_auc, the best on validation, 0.8731)" \
        in text
    # A run written before the record existed: no sentence rather than a wrong one.
    old = {k: baseline[k] for k in ("backbone_image_passes", "siamese_seconds", "untrained_encoder_test_knn_auc")}
    assert "kept the weights" not in model_card("r", load_config(), INFO, METRICS, GROUPS, old, generated=False)


def test_calibration_is_measured_where_the_data_is_the_population_shown():
    """External data with 8.2% melanoma against a calibration fitted at 24.5%: shown at 8.2% the figures are
    measured there; shown at the run's own prevalence the reader is told which flag measures them."""
    from melanoma_siamese.model_card import calibration_measured

    part = {"ece_before": 0.232, "ece_after": 0.110, "brier_before": 0.17, "brier_after": 0.089,
            "melanoma_share": 0.082, "ece_shown": 0.0074, "brier_shown": 0.065}
    matched = calibration_measured({"fitted_prevalence": 0.245, "shown_at_prevalence": 0.082, "test": part},
                                   where="external data ham10000")
    assert "At the prevalence shown, 8.20%, which is this data's own share, the probabilities shown have ECE " \
           "0.007 and Brier 0.065" in matched and "not what these figures measure" not in matched
    own = calibration_measured({"fitted_prevalence": 0.245, "shown_at_prevalence": 0.246, "test": part},
                               where="external data ham10000")
    assert "The external data ham10000 has 8.2% melanoma, unlike the 24.5% the calibration was fitted at: " \
           "`--prevalence 0.082` shows its probabilities at its own share" in own


def test_licence_by_source():
    assert licence({"data": "/x/ham10000-sample"}, "kaggle-256", False) == LICENCES["ham10000"]
    assert licence({"data": "/x/synthetic"}, "kaggle-256", True) == LICENCES["generated"]
    assert licence({"metadata": "/x/my.csv"}, "custom", False) == LICENCES["unknown"]


def test_card_says_what_a_run_lacks():
    text = model_card("r", load_config(), {}, {}, None, None, generated=True)
    assert "None: this run shows the classifier's raw score." in text
    assert "has no sex, age, site or skin type to group by" in text


def test_evaluate_writes_card_and_groups(tiny_data, tmp_path_factory):
    run = RunFolder(shared_run(tiny_data, tmp_path_factory))
    text = run.model_card.read_text()
    assert "## Metrics (test part)" in text and "generated" in text and str(run.root) in text
    history = [json.loads(line) for line in run.history("siamese").read_text().splitlines()]
    kept = [h["epoch"] for h in history if h.get("best")][-1]
    assert f"- Stage 1 ran {history[-1]['epoch']} epoch(s) and kept the weights of epoch {kept} " in text
    report = json.loads(run.metrics_by_group.read_text())
    assert report["threshold"] == json.loads(run.thresholds.read_text())["classifier"]
    assert set(report) >= {"groupings", "absent", "min_melanoma"}


def test_evaluate_with_a_relative_run_writes_absolute_paths(tiny_data, tmp_path_factory, monkeypatch):
    run = private_copy(shared_run(tiny_data, tmp_path_factory), tmp_path_factory.mktemp("relative"))
    monkeypatch.chdir(run.parent)
    assert main(["evaluate", "--run", run.name, "--no-progress"]) == 0
    text = RunFolder(run).model_card.read_text()
    assert text.startswith(f"# Model card: {run.resolve()}") and f"--config {run.resolve()}/config.yaml" in text


def test_external_card_keeps_training_and_scored_data_apart():
    """`evaluate --data OTHER`: the card names the run's training data and the external data apart, says all of
    the external data was scored with no split, and repeats the evaluation rather than training on OTHER."""
    external = {"name": "other", "source": {"data": "/x/other"}, "layout": "kaggle-256", "generated": True,
                "parts": {"scored": {"images": 24, "melanoma": 6}}}
    text = model_card("runs/isic", load_config(), INFO, METRICS, GROUPS, None, generated=False, external=external)
    assert text.startswith("# Model card: runs/isic, evaluated on external data other")
    training = text[text.index("## Training data (the run's)"):text.index("## External data (scored here)")]
    assert "`--data /data/isic2020-jpg-256`" in training and "Images: 1000" in training and "CC BY-NC 4.0" in training
    scored = text[text.index("## External data (scored here)"):text.index("## Recipe and budget")]
    assert "`--data /x/other`" in scored and "Images: 24, of which 6 melanoma" in scored and "none needed" in scored
    assert "Scored whole" in scored and "## Split" not in text
    assert "## Metrics (external data other, all of it)" in text
    assert "On the external data other, all of it: expected calibration error 0.300" in text
    assert "melanoma-siamese evaluate --run runs/isic --data /x/other" in text and "melanoma-siamese train" not in text


def test_card_names_the_flag_when_evaluate_was_given_a_prevalence():
    """`evaluate --prevalence P` shows probabilities at P, while plain predict and serve keep the run's own:
    the card must say which command shows the threshold it quotes."""
    stated = {**METRICS, "calibration": {**METRICS["calibration"],
                                         "shown_prevalence_source": "stated with --prevalence"}}
    text = model_card("runs/isic", load_config(), INFO, stated, GROUPS, None, generated=False)
    assert "the same cut as 0.1234 on the calibrated probability `predict --prevalence 0.02` shows" in text
    assert "`predict` and `serve` show the run's own prevalence unless given the same" in text
    plain = model_card("runs/isic", load_config(), INFO, METRICS, GROUPS, None, generated=False)
    assert "calibrated probability `predict` shows" in plain and "unless given the same" not in plain


def test_card_gives_both_unfamiliar_cuts_and_what_each_flags():
    unfamiliar = {"k": 5, "quantile": 0.99, "cut": 0.0812, "texture": {"k": 5, "quantile": 0.99, "cut": 0.0034},
                  "flagged_share": {"test": 0.03}, "flagged_share_embedding": {"test": 0.01},
                  "flagged_share_texture": {"test": 0.025}}
    text = model_card("runs/isic", load_config(), INFO, {**METRICS, "unfamiliar": unfamiliar}, GROUPS, None,
                      generated=False)
    section = text[text.index("## Unfamiliar images"):text.index("## Intended use")]
    assert "(cut 0.0812)" in section and "(cut 0.00340)" in section  # three significant digits
    assert "3.0% of test (1.0% by the embedding, 2.5% by texture)" in section
    assert "each cut also flags about 1% of images like the validation ones" in section


def test_card_says_when_a_run_has_no_texture_rule():
    unfamiliar = {"k": 5, "quantile": 0.99, "cut": 0.0812, "texture": None, "flagged_share": {"test": 0.01},
                  "flagged_share_embedding": {"test": 0.01}}
    text = model_card("r", load_config(), INFO, {**METRICS, "unfamiliar": unfamiliar}, GROUPS, None, generated=False)
    section = text[text.index("## Unfamiliar images"):text.index("## Intended use")]
    assert "this run has no texture rule" in section and "by texture" not in section and "1.0% of test." in section


def test_evaluate_names_the_flag_only_for_a_prevalence_not_the_runs_own(tiny_data, tmp_path_factory, tmp_path):
    run = private_copy(shared_run(tiny_data, tmp_path_factory), tmp_path)
    assert main(["evaluate", "--run", str(run), "--prevalence", "0.02", "--no-progress"]) == 0
    card = (run / "MODEL_CARD.md").read_text()
    assert "calibrated probability `predict --prevalence 0.02` shows" in card and "unless given the same" in card
    # The same prevalence in the run's own configuration: plain predict shows it, and the card must not say otherwise.
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["evaluation"]["prevalence"] = 0.02
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    assert main(["evaluate", "--run", str(run), "--no-progress"]) == 0
    card = (run / "MODEL_CARD.md").read_text()
    assert "(set by evaluation.prevalence)" in card and "calibrated probability `predict` shows" in card
    assert "unless given the same" not in card
