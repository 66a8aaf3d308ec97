"""Score a trained run: predictions, the threshold chosen on validation, metrics, plots, retrieval index."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import classification_report

from . import plots
from .checkpoint import load_model
from .config import Config
from .data.prepare import Prepared, balanced_test_ids
from .engine import embed, melanoma_probability
from .metrics import binary_report, bootstrap_ci, choose_threshold, knn_probabilities

Log = Callable[[str], None]


def _clean(value):
    """JSON without NaN: NaN becomes null."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def score(frame: pd.DataFrame, prob_column: str, threshold: float, config: Config, balanced_ids: np.ndarray) -> dict:
    """Metrics at the chosen threshold and at 0.5, on the natural test and the balanced subsample."""
    y, p = frame["target"].to_numpy(), frame[prob_column].to_numpy()
    out = {"test": binary_report(y, p, threshold), "test_at_0.5": binary_report(y, p, 0.5)}
    if len(np.unique(y)) == 2 and config.evaluation.bootstrap:
        out["test"].update(bootstrap_ci(y, p, frame["patient_id"].to_numpy(), threshold, config.evaluation.bootstrap,
                                        config.runtime.seed))
    balanced = frame[frame["isic_id"].isin(set(balanced_ids))]
    if len(balanced):
        out["test_balanced"] = binary_report(balanced["target"].to_numpy(), balanced[prob_column].to_numpy(), threshold)
    return out


def print_report(name: str, frame: pd.DataFrame, prob_column: str, report: dict, log: Log) -> None:
    y = frame["target"].to_numpy()
    pred = (frame[prob_column].to_numpy() >= report["threshold"]).astype(int)
    cm = report["confusion_matrix"]
    log(f"--- {name}: {report['n']} images, {report['n_melanoma']} melanoma; threshold {report['threshold']:.4f} ---")
    log(f"Accuracy: {100 * report['accuracy']:.2f}%   Balanced accuracy: {100 * report['balanced_accuracy']:.2f}%")
    log(f"ROC AUC: {report['roc_auc']:.4f}" + (f" (95% CI {report['roc_auc_ci'][0]:.4f}-{report['roc_auc_ci'][1]:.4f}, "
                                              "patient bootstrap)" if "roc_auc_ci" in report else "")
        + f"   Average precision: {report['average_precision']:.4f}")
    log(f"Sensitivity: {report['sensitivity']:.4f}   Specificity: {report['specificity']:.4f}")
    log(f"Confusion matrix [rows true benign/melanoma, cols predicted]: {cm[0]} {cm[1]}")
    log(classification_report(y, pred, labels=[0, 1], target_names=["benign", "melanoma"], zero_division=0, digits=4))


def _predict_parts(encoder, classifier, prepared: Prepared, parts: tuple[str, ...], config: Config,
                   device: torch.device, reference: tuple[np.ndarray, np.ndarray]) -> tuple[pd.DataFrame, dict]:
    d = config.data
    frames, embeddings = [], {}
    for part in parts:
        frame = prepared.part(part)[["isic_id", "patient_id", "target", "row"]].copy()
        emb = embed(encoder, prepared.array, frame["row"].to_numpy(), d.mean, d.std, device,
                    tta=config.evaluation.tta, progress=config.runtime.progress, desc=f"Embedding {part}")
        frame["prob_melanoma"] = melanoma_probability(classifier, emb)
        frame["knn_prob_melanoma"] = knn_probabilities(emb, reference[0], reference[1], config.evaluation.knn_k)
        frame["part"] = part
        frames.append(frame)
        embeddings[part] = emb
    return pd.concat(frames, ignore_index=True), embeddings


def _plots(frame_test: pd.DataFrame, test_emb: np.ndarray, report: dict, out_dir: Path, seed: int) -> None:
    images = out_dir / "images"
    y = frame_test["target"].to_numpy()
    curves = {"MLP / classifier": (y, frame_test["prob_melanoma"].to_numpy()),
              "kNN vote": (y, frame_test["knn_prob_melanoma"].to_numpy())}
    plots.confusion_matrix(report["confusion_matrix"], images / "confusion_matrix.png",
                           f"Test, threshold {report['threshold']:.3f}")
    plots.roc_curves(curves, images / "roc_curve.png")
    plots.pr_curves(curves, images / "pr_curve.png")
    if len(np.unique(y)) == 2:
        plots.reliability(y, frame_test["prob_melanoma"].to_numpy(), images / "reliability.png")
    if len(y) >= 5:
        plots.embedding_map(test_emb, y, images / "embedding_map.png", seed)
        plots.distance_histograms(test_emb[:3000], y[:3000], images / "distance_hist.png")


def evaluate_run(run_dir: Path, config: Config, prepared: Prepared, device: torch.device, log: Log = print,
                 external: Optional[Path] = None) -> dict:
    """Evaluate on the saved split's test part, or (external) on every image of another dataset."""
    run_dir = Path(run_dir)
    encoder, _ = load_model(run_dir / "models" / "siamese.pth", "siamese")
    classifier, _ = load_model(run_dir / "models" / "classifier.pth", "classifier")
    encoder.to(device)
    d = config.data
    if external is None:
        train = prepared.part("train")
        ref_emb = embed(encoder, prepared.array, train["row"].to_numpy(), d.mean, d.std, device,
                        progress=config.runtime.progress, desc="Embedding train")
        ref_labels = train["target"].to_numpy()
        frame, embeddings = _predict_parts(encoder, classifier, prepared, ("val", "test"), config, device,
                                           (ref_emb, ref_labels))
        val = frame[frame["part"] == "val"]
        rule = config.evaluation
        threshold = choose_threshold(val["target"].to_numpy(), val["prob_melanoma"].to_numpy(), rule.threshold,
                                     rule.target_sensitivity, rule.fixed_threshold)
        knn_threshold = choose_threshold(val["target"].to_numpy(), val["knn_prob_melanoma"].to_numpy(),
                                         rule.threshold, rule.target_sensitivity, rule.fixed_threshold)
        val_emb = embeddings["val"]
        np.savez(run_dir / "index.npz",
                 embeddings=np.concatenate([ref_emb, val_emb]).astype(np.float32),
                 ids=np.concatenate([train["isic_id"].to_numpy(), val["isic_id"].to_numpy()]).astype(str),
                 labels=np.concatenate([ref_labels, val["target"].to_numpy()]),
                 parts=np.array(["train"] * len(train) + ["val"] * len(val)))
        thresholds = {"rule": rule.threshold, "target_sensitivity": rule.target_sensitivity,
                      "classifier": threshold, "knn": knn_threshold}
        (run_dir / "threshold.json").write_text(json.dumps(thresholds, indent=2))
        out_dir = run_dir
        balanced_ids = balanced_test_ids(prepared, d.balanced_test_per_class, config.runtime.seed)
    else:
        index = np.load(run_dir / "index.npz")
        keep = index["parts"] == "train"
        reference = (index["embeddings"][keep], index["labels"][keep])
        thresholds = json.loads((run_dir / "threshold.json").read_text())
        threshold, knn_threshold = thresholds["classifier"], thresholds["knn"]
        prepared.table["part"] = "test"
        frame, embeddings = _predict_parts(encoder, classifier, prepared, ("test",), config, device, reference)
        out_dir = run_dir / "external" / Path(external).resolve().name
        (out_dir / "images").mkdir(parents=True, exist_ok=True)
        balanced_ids = balanced_test_ids(prepared, d.balanced_test_per_class, config.runtime.seed) \
            if prepared.table["target"].nunique() == 2 else np.array([])
    test = frame[frame["part"] == "test"]
    metrics = {"threshold": thresholds}
    metrics.update(score(test, "prob_melanoma", threshold, config, balanced_ids))
    metrics["knn"] = score(test, "knn_prob_melanoma", knn_threshold, config, balanced_ids)
    if external is None:
        val = frame[frame["part"] == "val"]
        metrics["val"] = binary_report(val["target"].to_numpy(), val["prob_melanoma"].to_numpy(), threshold)
        metrics["knn"]["val"] = binary_report(val["target"].to_numpy(), val["knn_prob_melanoma"].to_numpy(),
                                              knn_threshold)
        baseline_file = run_dir / "baseline.json"
        if baseline_file.is_file():
            metrics["baseline"] = json.loads(baseline_file.read_text())
    frame.drop(columns=["row"]).rename(columns={"target": "label"}).to_csv(out_dir / "predictions.csv", index=False)
    (out_dir / "metrics.json").write_text(json.dumps(_clean(metrics), indent=2))
    print_report("Test, natural prevalence (classifier)", test, "prob_melanoma", metrics["test"], log)
    if "test_balanced" in metrics:
        bal = test[test["isic_id"].isin(set(balanced_ids))]
        print_report("Test, class-balanced subsample (classifier)", bal, "prob_melanoma", metrics["test_balanced"], log)
    k = metrics["knn"]["test"]
    log(f"kNN vote (k={config.evaluation.knn_k}) on test: ROC AUC {k['roc_auc']:.4f}, balanced accuracy "
        f"{100 * k['balanced_accuracy']:.2f}%")
    _plots(test, embeddings["test"], metrics["test"], out_dir, config.runtime.seed)
    log(f"Wrote {out_dir / 'metrics.json'}, {out_dir / 'predictions.csv'} and plots in {out_dir / 'images'}")
    return metrics
