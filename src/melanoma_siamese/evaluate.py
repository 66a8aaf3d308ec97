"""Score a trained run: predictions, the threshold chosen on validation, metrics, plots, retrieval index."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import classification_report

from . import plots
from .config import Config
from .data.prepare import Prepared, balanced_test_ids
from .engine import embed, melanoma_probability
from .features import model_input
from .inference import LoadedRun, RetrievalIndex, load_run
from .model_card import calibration_measured, overlap_sentence, shown_by
from .metrics import binary_report, bootstrap_ci, choose_threshold, interval_text, knn_probabilities
from .runfolder import RunFolder, write_text_atomic

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
        yb, pb = balanced["target"].to_numpy(), balanced[prob_column].to_numpy()
        out["test_balanced"] = binary_report(yb, pb, threshold)
        if len(np.unique(yb)) == 2 and config.evaluation.bootstrap:
            out["test_balanced"].update(bootstrap_ci(yb, pb, balanced["patient_id"].to_numpy(), threshold,
                                                     config.evaluation.bootstrap, config.runtime.seed))
    return out


def threshold_scale(metrics: dict) -> str:
    """Words after the classifier's threshold wherever evaluate shows it: the threshold is on the raw score,
    while predict, pair and serve show calibrated probabilities with the threshold on their scale; a reader
    comparing 0.73 here with 0.17 there must see that both are the same cut."""
    cal = metrics.get("calibration")
    if not cal or "threshold_shown" not in cal:
        return " (raw score, as shown by predict: the run has no calibration)"
    return (f" on the raw score (= {cal['threshold_shown']:.4f} as the probability {shown_by(cal)} shows at "
            f"{100 * cal['shown_at_prevalence']:.2f}% prevalence)")


def print_report(name: str, frame: pd.DataFrame, prob_column: str, report: dict, log: Log, scale: str = "") -> None:
    y = frame["target"].to_numpy()
    pred = (frame[prob_column].to_numpy() >= report["threshold"]).astype(int)
    cm = report["confusion_matrix"]
    log(f"--- {name}: {report['n']} images, {report['n_melanoma']} melanoma; threshold {report['threshold']:.4f}"
        f"{scale} ---")
    log(f"Accuracy: {100 * report['accuracy']:.2f}%   Balanced accuracy: {100 * report['balanced_accuracy']:.2f}%")
    log(f"ROC AUC: {report['roc_auc']:.4f}{interval_text(report, 'roc_auc', 4, note=', patient bootstrap')}"
        f"   Average precision: {report['average_precision']:.4f}")
    log(f"Sensitivity: {report['sensitivity']:.4f}{interval_text(report, 'sensitivity', 4)}   "
        f"Specificity: {report['specificity']:.4f}{interval_text(report, 'specificity', 4)}")
    log(f"Confusion matrix [rows true benign/melanoma, cols predicted]: {cm[0]} {cm[1]}")
    log(classification_report(y, pred, labels=[0, 1], target_names=["benign", "melanoma"], zero_division=0, digits=4))


def _predict_parts(run: LoadedRun, prepared: Prepared, parts: tuple[str, ...],
                   reference: tuple[np.ndarray, np.ndarray]) -> tuple[pd.DataFrame, dict]:
    config, d = run.config, run.config.data
    frames, embeddings = [], {}
    for part in parts:
        table = prepared.part(part)
        frame = table[["isic_id", "patient_id", "target", "row"]].copy()
        emb = embed(run.encoder, prepared.array, frame["row"].to_numpy(), d.mean, d.std,
                    tta=config.evaluation.tta, progress=f"Embedding {part}" if config.runtime.progress else None)
        # Patient context is taken within the scored part, as training took it within the training part.
        frame["prob_melanoma"] = melanoma_probability(run.classifier, model_input(run.features, emb, table))
        frame["knn_prob_melanoma"] = knn_probabilities(emb, reference[0], reference[1], config.evaluation.knn_k)
        frame["part"] = part
        frames.append(frame)
        embeddings[part] = emb
    return pd.concat(frames, ignore_index=True), embeddings


def _plots(frame_test: pd.DataFrame, test_emb: np.ndarray, metrics: dict, out: RunFolder, seed: int,
           calibration=None, where: str = "test part") -> None:
    y = frame_test["target"].to_numpy()
    curves = {"MLP / classifier": (y, frame_test["prob_melanoma"].to_numpy()),
              "kNN vote": (y, frame_test["knn_prob_melanoma"].to_numpy())}
    report, cal = metrics["test"], metrics.get("calibration") or {}
    shown = (f"\n(= {cal['threshold_shown']:.3f} as the probability {shown_by(cal)} shows)"
             if "threshold_shown" in cal else "")
    plots.confusion_matrix(report["confusion_matrix"], out.image("confusion_matrix.png"),
                           f"{where[0].upper() + where[1:]}, raw-score threshold {report['threshold']:.3f}{shown}")
    plots.roc_curves(curves, out.image("roc_curve.png"), where)
    plots.pr_curves(curves, out.image("pr_curve.png"), where)
    if len(np.unique(y)) == 2:
        raw = frame_test["prob_melanoma"].to_numpy()
        scores, caption = {"raw score": raw}, "Raw score only: the run has no calibration."
        if calibration is not None:
            from .calibration import apply

            # At the prevalence it was fitted at, as the caption says, not at the one shown (--prevalence).
            scores[f"calibrated ({calibration.method}, on validation)"] = apply(calibration, raw)
            caption = plots.calibration_caption(calibration.method, calibration.prevalence, float(y.mean()), where,
                                                cal.get("shown_at_prevalence"), shown_by(cal))
        plots.reliability_before_after(y, scores, out.image("reliability.png"), title=f"Reliability, {where}",
                                       caption=caption)
    if len(y) >= 5:
        plots.embedding_map(test_emb, y, out.image("embedding_map.png"), seed, where=where)
        plots.distance_histograms(test_emb[:3000], y[:3000], out.image("distance_hist.png"), where)


def _on_saved_split(run: LoadedRun, prepared: Prepared) -> tuple[pd.DataFrame, dict, dict]:
    """Embed train (the kNN reference), val and test; choose both thresholds on val; write index and thresholds."""
    config, d, folder = run.config, run.config.data, run.folder
    train = prepared.part("train")
    ref_emb = embed(run.encoder, prepared.array, train["row"].to_numpy(), d.mean, d.std,
                    progress="Embedding train" if config.runtime.progress else None)
    ref_labels = train["target"].to_numpy()
    frame, embeddings = _predict_parts(run, prepared, ("val", "test"), (ref_emb, ref_labels))
    val = frame[frame["part"] == "val"]
    rule = config.evaluation
    thresholds = {"rule": rule.threshold, "target_sensitivity": rule.target_sensitivity}
    for name, column in (("classifier", "prob_melanoma"), ("knn", "knn_prob_melanoma")):
        thresholds[name] = choose_threshold(val["target"].to_numpy(), val[column].to_numpy(), rule.threshold,
                                            rule.target_sensitivity, rule.fixed_threshold)
    _write_index(folder, prepared, train, val, (ref_emb, embeddings["val"]))
    folder.write_thresholds(thresholds)
    run.thresholds = folder.read_thresholds()
    run.index = RetrievalIndex(**folder.read_index())
    run.trust = _fit_trust(run, val)
    folder.write_trust(run.trust)
    return frame, embeddings, thresholds


def _write_index(folder: RunFolder, prepared: Prepared, train: pd.DataFrame, val: pd.DataFrame,
                 embeddings: tuple[np.ndarray, np.ndarray]) -> None:
    """The retrieval index: train and val embeddings, ids, labels, parts, and appearance descriptors."""
    appearance = _appearance(prepared.array, np.concatenate([train["row"].to_numpy(), val["row"].to_numpy()]))
    folder.write_index(np.concatenate(embeddings),
                       np.concatenate([train["isic_id"].to_numpy(), val["isic_id"].to_numpy()]),
                       np.concatenate([train["target"].to_numpy(), val["target"].to_numpy()]),
                       np.array(["train"] * len(train) + ["val"] * len(val)), appearance)


def _appearance(array: np.ndarray, rows: np.ndarray, chunk: int = 512) -> np.ndarray:
    """Appearance descriptors of cache rows, read a chunk at a time (a whole part may not fit in memory)."""
    from .familiarity import appearance_features

    return np.concatenate([appearance_features(np.asarray(array[rows[i:i + chunk]]))
                           for i in range(0, max(len(rows), 1), chunk)])


def _fit_trust(run: LoadedRun, val: pd.DataFrame) -> dict:
    """What makes an answer readable, fitted on the validation part: the calibration of the classifier's
    score, how the unfamiliar-image cuts were chosen, and whether the run was trained on generated images."""
    from . import calibration
    from .data.synth import is_generated
    from .errors import ConfigError

    record = {"trained_on_generated_images": is_generated(run.folder.source().get("data"))}
    try:
        record["calibration"] = calibration.fit(val["target"].to_numpy(), val["prob_melanoma"].to_numpy(),
                                                run.config.evaluation.calibration).to_dict()
    except ConfigError as exc:
        record["calibration_skipped"] = str(exc)
    try:
        if run.familiarity is None:
            raise ConfigError("unfamiliar-image detection needs validation images")
        record["unfamiliar"] = run.familiarity.record()
        record["unfamiliar_appearance"] = {**run.appearance_rule.record(),
                                           "method": "the same, on appearance_features (texture histograms)"}
    except ConfigError as exc:
        record["unfamiliar_skipped"] = str(exc)
    return record


def _trust_metrics(run: LoadedRun, frame: pd.DataFrame, embeddings: dict, array: np.ndarray,
                   prevalence: Optional[float]) -> dict:
    """Calibration before/after (Brier, ECE) on each labelled part, the shown probability column, and the
    share of each part the unfamiliar-image rule flags."""
    from . import calibration

    out: dict = {}
    if run.calibration is not None:
        frame["probability"] = calibration.apply(run.calibration, frame["prob_melanoma"].to_numpy(), prevalence)
        out["calibration"] = {"method": run.calibration.method, "fitted_on": "validation part",
                              "fitted_prevalence": run.calibration.prevalence, "shown_at_prevalence": prevalence,
                              "threshold_shown": calibration.display_threshold(
                                  run.calibration, run.thresholds.classifier, prevalence)}
        for part, rows in frame.groupby("part"):
            if rows["target"].nunique() == 2:
                out["calibration"][part] = calibration.report(run.calibration, rows["target"].to_numpy(),
                                                              rows["prob_melanoma"].to_numpy(),
                                                              shown_prevalence=prevalence)
    if run.familiarity is not None:
        texture = None if run.appearance_rule is None else run.appearance_rule.record()
        out["unfamiliar"] = {**run.familiarity.record(), "texture": texture,
                             **_flagged_shares(run, frame, embeddings, array)}
    return out


def _flagged_shares(run: LoadedRun, frame: pd.DataFrame, embeddings: dict, array: np.ndarray) -> dict:
    """Share of each scored part the unfamiliar-image rule flags (by the embedding's or the texture's cut), and
    by each cut alone, so a reader can tell which of the two does the flagging."""
    from .inference import unfamiliar_flags

    # No texture rule, no share "by texture" to report.
    keys = ("flagged_share", "flagged_share_embedding") + (() if run.appearance_rule is None else
                                                            ("flagged_share_texture",))
    shares: dict = {key: {} for key in keys}
    for part, emb in embeddings.items():
        if len(emb):
            rows = frame.loc[frame["part"] == part, "row"].to_numpy()
            found, looks, flags = unfamiliar_flags(run, emb, _appearance(array, rows))
            for key, flagged in zip(keys, (flags, found["unfamiliar"], looks["unfamiliar"])):
                shares[key][part] = float(flagged.mean())
    return shares


def _on_other_data(run: LoadedRun, prepared: Prepared) -> tuple[pd.DataFrame, dict, dict]:
    """Every image of another dataset scored as test, against the run's saved index and thresholds; `run_part`
    names the run's own part of an image the run's split holds (by isic_id), empty for the rest."""
    train = run.index.part("train")
    prepared.table["part"] = "test"
    frame, embeddings = _predict_parts(run, prepared, ("test",), (train.embeddings, train.labels))
    split = run.folder.read_split()
    own = dict(zip(split["isic_id"].astype(str), split["part"]))
    frame["run_part"] = frame["isic_id"].astype(str).map(own).fillna("")
    return frame, embeddings, run.thresholds.record


def _overlap(frame: pd.DataFrame, threshold: float, config: Config) -> Optional[dict]:
    """External data that holds the run's own training or validation images (the full HAM10000 holds a sample
    a run trained on): how many, and the metrics on the images the run neither trained nor tuned on, since the
    numbers on all of them overstate (a training image finds itself in the index, and the threshold, calibration
    and unfamiliar cut were chosen on the validation images)."""
    seen = frame["run_part"].isin(["train", "val"])
    if not seen.any():
        return None
    counts = {part: int((frame["run_part"] == part).sum()) for part in ("train", "val", "test")}
    unseen = frame[~seen]
    out = {"images": counts, "melanoma": {part: int(frame.loc[frame["run_part"] == part, "target"].sum())
                                          for part in counts},
           "unseen_images": int(len(unseen)), "unseen_melanoma": int(unseen["target"].sum())}
    if unseen["target"].nunique() == 2:
        out["unseen"] = score(unseen, "prob_melanoma", threshold, config, np.array([]))["test"]
    return out


def evaluate_run(run_dir: Path | RunFolder, config: Config, prepared: Prepared, device: torch.device,
                 log: Log = print, external: Optional[Path] = None,
                 on_test: Optional[Callable[[pd.DataFrame, np.ndarray], None]] = None) -> dict:
    """Evaluate on the saved split's test part, or (external) on every image of another dataset.
    `on_test` receives the scored test rows and their embeddings (the training tracker's projector uses them)."""
    folder = run_dir if isinstance(run_dir, RunFolder) else RunFolder(run_dir)
    run = load_run(folder, device, config=config, with_index=external is not None)
    d = config.data
    if external is None:
        frame, embeddings, thresholds = _on_saved_split(run, prepared)
        out = folder
        balanced_ids = balanced_test_ids(prepared, d.balanced_test_per_class, config.runtime.seed)
    else:
        frame, embeddings, thresholds = _on_other_data(run, prepared)
        out = folder.external(Path(external).resolve().name)
        out.images.mkdir(parents=True, exist_ok=True)
        balanced_ids = balanced_test_ids(prepared, d.balanced_test_per_class, config.runtime.seed) \
            if prepared.table["target"].nunique() == 2 else np.array([])
    metrics = _metrics(frame, thresholds, config, balanced_ids, folder if external is None else None)
    if external is not None:
        overlap = _overlap(frame, thresholds.get("classifier", 0.5), config)
        if overlap is not None:
            metrics["overlap_with_run"] = overlap
    # Stated only when it differs from the run's own setting: what its configuration holds, predict shows too.
    own = folder.read_config().evaluation.prevalence
    stated = config.evaluation.prevalence if config.evaluation.prevalence != own else None
    prevalence, source = run.prevalence(stated)
    metrics.update(_trust_metrics(run, frame, embeddings, prepared.array, prevalence))
    if "calibration" in metrics:
        metrics["calibration"]["shown_prevalence_source"] = source
    written = frame.drop(columns=["row"]).rename(columns={"target": "label"})
    # Scored as the test part, but not the run's test part: external data says so (run_part: the run's own part).
    (written if external is None else written.assign(part="external")).to_csv(out.predictions, index=False)
    out.write_metrics(_clean(metrics))
    test = frame[frame["part"] == "test"]
    record = None if external is None else _external_record(Path(external), prepared, test)
    where = "test part" if record is None else f"external data {record['name']}"
    _report(frame, metrics, balanced_ids, config, log, where)
    _plots(test, embeddings["test"], metrics, out, config.runtime.seed, run.calibration, where)
    _groups_and_card(run, out, test, prepared, metrics, log, record, where)
    if on_test is not None:
        on_test(test, embeddings["test"])
    log(f"Wrote {out.metrics}, {out.predictions}, {out.metrics_by_group.name}, {out.model_card.name} and plots in "
        f"{out.images}")
    return metrics


def _external_record(external: Path, prepared: Prepared, test: pd.DataFrame) -> dict:
    """What the model card says of the data an external evaluation scored (every image of it)."""
    from .data.synth import is_generated

    ds = prepared.dataset
    source = ({"data": str(external.resolve())} if external.is_dir() else
              {"metadata": str(ds.metadata_file.resolve()), "images": str(Path(ds.image_dir).resolve())})
    return {"name": external.resolve().name, "source": source, "layout": ds.layout,
            "generated": is_generated(external if external.is_dir() else None),
            "parts": {"scored": {"images": int(len(test)), "melanoma": int(test["target"].sum())}}}


def _groups_and_card(run: LoadedRun, out: RunFolder, test: pd.DataFrame, prepared: Prepared, metrics: dict,
                     log: Log, external: Optional[dict] = None, where: str = "test part") -> None:
    """Results by group (JSON, plot, printed table) on the test part at the run's threshold, and the model card."""
    from . import groups as by_group
    from .model_card import model_card

    clinical = [c for c in ("age", "sex", "site", "skin_type") if c in prepared.table]
    frame = test.merge(prepared.table[["isic_id", *clinical]], on="isic_id", how="left")
    report = by_group.results_by_group(frame, "prob_melanoma", metrics["threshold"].get("classifier", 0.5),
                                       run.config.evaluation.bootstrap, run.config.runtime.seed)
    out.write_json(out.metrics_by_group, _clean(report))
    if report["groupings"]:
        plots.results_by_group(report, out.image("metrics_by_group.png"), where)
    by_group.print_groups(report, log, f"--- {'Test results' if external is None else 'Results, ' + where} by group "
                                       f"(threshold {report['threshold']:.4f}"
                                       f"{threshold_scale(metrics)}; patient-bootstrap 95% CIs) ---")
    # Absolute: the card's reproduce commands must work from wherever it is read, not only from evaluate's folder.
    card = model_card(str(run.folder.root.resolve()), run.config, run.folder.run_info(), _clean(metrics),
                      _clean(report), run.folder.read_baseline(), run.generated, external)
    write_text_atomic(out.model_card, card)


def _metrics(frame: pd.DataFrame, thresholds: dict, config: Config, balanced_ids: np.ndarray,
             saved_split: Optional[RunFolder]) -> dict:
    """Test metrics of both scores; on the saved split also validation's and the recorded baseline."""
    test = frame[frame["part"] == "test"]
    threshold, knn_threshold = thresholds.get("classifier", 0.5), thresholds.get("knn", 0.5)
    metrics = {"threshold": thresholds}
    metrics.update(score(test, "prob_melanoma", threshold, config, balanced_ids))
    metrics["knn"] = score(test, "knn_prob_melanoma", knn_threshold, config, balanced_ids)
    if saved_split is not None:
        val = frame[frame["part"] == "val"]
        metrics["val"] = binary_report(val["target"].to_numpy(), val["prob_melanoma"].to_numpy(), threshold)
        metrics["knn"]["val"] = binary_report(val["target"].to_numpy(), val["knn_prob_melanoma"].to_numpy(),
                                              knn_threshold)
        baseline = saved_split.read_baseline()
        if baseline is not None:
            metrics["baseline"] = baseline
        folds = saved_split.read_folds_summary()
        if folds is not None:
            metrics["folds"] = folds
    return metrics


def _report(frame: pd.DataFrame, metrics: dict, balanced_ids: np.ndarray, config: Config, log: Log,
            where: str = "test part") -> None:
    test, scale = frame[frame["part"] == "test"], threshold_scale(metrics)
    name = "Test" if where == "test part" else where[0].upper() + where[1:]
    if "overlap_with_run" in metrics:  # before the numbers it qualifies
        log(overlap_sentence(metrics["overlap_with_run"]))
    print_report(f"{name}, natural prevalence (classifier)", test, "prob_melanoma", metrics["test"], log, scale)
    if "test_balanced" in metrics:
        bal = test[test["isic_id"].isin(set(balanced_ids))]
        print_report(f"{name}, class-balanced subsample (classifier)", bal, "prob_melanoma", metrics["test_balanced"],
                     log, scale)
    k = metrics["knn"]["test"]
    log(f"kNN vote (k={config.evaluation.knn_k}) on {'test' if where == 'test part' else where}: ROC AUC "
        f"{k['roc_auc']:.4f}, balanced accuracy "
        f"{100 * k['balanced_accuracy']:.2f}%")
    _report_trust(metrics, log, where)


def _report_trust(metrics: dict, log: Log, where: str = "test part") -> None:
    """The calibration and the unfamiliar-image rule, in a line each (`where`: what the "test" rows are)."""
    cal = metrics.get("calibration")
    if cal and "test" in cal:
        log(f"Calibration ({cal['method']}, fitted on validation): probabilities shown for a prevalence of "
            f"{100 * cal['shown_at_prevalence']:.2f}% ({cal['shown_prevalence_source']}), threshold on that scale "
            f"{cal['threshold_shown']:.4f}. On the {where}: {calibration_measured(cal, where=where)}")
    rule = metrics.get("unfamiliar")
    if rule:
        name = {"test": where, "val": "validation part"}
        shares = ", ".join(f"{100 * v:.1f}% of the {name.get(part, part)}" for part, v in rule["flagged_share"].items())
        log(f"Unfamiliar-image rule (cut at the validation {100 * rule['quantile']:g}th percentile): flags {shares}")
