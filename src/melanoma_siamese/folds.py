"""K-fold ensembles (`data.folds: K`, `train --folds K`): K models, each trained on the training part less one
patient-grouped, label-stratified fold and validated on that fold; their out-of-fold predictions; and the
ensemble (models.EnsembleEncoder / EnsembleClassifier) saved as the run's own models, so every command that
reads a run (evaluate, predict, pair, serve, export) uses the ensemble as it uses one model.

The run's validation and test parts are those one model would have, and no member trains on either: the
ensemble's threshold, calibration and unfamiliar-image rule are fitted on the validation part, as one model's
are. (Out-of-fold scores could stand in for it, but they are single members' scores, and the mean of K is less
spread than any one of them.) Each member is a run folder of its own under folds/; `train --resume` skips the
members that finished and continues the interrupted one from its last completed epoch.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable, Optional

import numpy as np
import pandas as pd
import torch

from .checkpoint import load_model, save_model
from .config import Config, dump_yaml, with_overrides
from .data.prepare import Prepared, write_split
from .data.split import fold_problems
from .distributed import process_group
from .errors import DataError
from .hooks import Hooks, hooks_from_env
from .metrics import binary_report, bootstrap_ci, interval_text
from .models import EnsembleClassifier, EnsembleEncoder
from .runfolder import RunFolder, write_text_atomic
from .stage1 import train_siamese
from .stage2 import train_classifier
from .tracking import open_tracker, session_log
from .train import DataSource, prepare_run, report_stage1, run_train
from .train_state import read_state

Log = Callable[[str], None]


def run_training(config: Config, source: DataSource, run_dir, stage: str = "all", log: Log = print,
                 resume: bool = False, hooks: Optional[Hooks] = None) -> dict:
    """`train`: one model (train.run_train), or a K-fold ensemble where config.data.folds is K >= 2."""
    if config.data.folds < 2:
        return run_train(config, source, run_dir, stage, log, resume, hooks)
    return run_folds(config, source, RunFolder(run_dir), stage, log, resume, hooks)


def assign_folds(train: pd.DataFrame, k: int, seed: int, where: str) -> np.ndarray:
    """A fold (0..k-1) per row of the training part: no patient in two folds, and each fold's share of melanoma
    close to the part's (scikit-learn's StratifiedGroupKFold). Each fold must hold both classes."""
    from sklearn.model_selection import StratifiedGroupKFold

    problems = fold_problems(train, k, where)
    if problems:
        raise DataError(problems)
    y, patients = train["target"].to_numpy(), train["patient_id"].astype(str).to_numpy()
    folds = np.empty(len(y), dtype=np.int64)
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    for fold, (_, held) in enumerate(splitter.split(np.zeros(len(y)), y, patients)):
        folds[held] = fold
    return folds


def member_prepared(prepared: Prepared, folds: pd.Series, fold: int) -> Prepared:
    """The data as member `fold` sees it: the other folds train, this fold validates, the test part stays;
    the run's validation part is left out (part "unused"), kept for the ensemble."""
    table = prepared.table.copy()
    in_train = table["part"] == "train"
    own = table["isic_id"].map(folds).to_numpy() == fold
    table["part"] = np.where(in_train & own, "val", np.where(in_train, "train",
                             np.where(table["part"] == "test", "test", "unused")))
    return dataclasses.replace(prepared, table=table)


def _fold_table(prepared: Prepared, run: RunFolder, config: Config, reuse: bool, main: bool) -> pd.Series:
    """isic_id -> fold of each training image: read from folds.csv when resuming, else assigned (and written)."""
    if reuse and run.folds_file.is_file():
        saved = pd.read_csv(run.folds_file, dtype={"isic_id": str})
        return pd.Series(saved["fold"].to_numpy(), index=saved["isic_id"])
    train = prepared.part("train")
    folds = assign_folds(train, config.data.folds, config.runtime.seed, str(prepared.dataset.metadata_file))
    table = train[["isic_id", "patient_id", "target"]].assign(fold=folds)
    if main:
        table.to_csv(run.folds_file, index=False)
    return pd.Series(folds, index=train["isic_id"].to_numpy())


def _write_member(member: RunFolder, config: Config, prepared: Prepared, info: dict, fold: int) -> None:
    """A member's own run folder files: configuration, split, and run.json with its parts and fold."""
    member.make()
    write_split(prepared, member.split)
    write_text_atomic(member.config, dump_yaml(config))
    counts = prepared.table.groupby("part")["target"].agg(["count", "sum"])
    member.write_json(member.run_json, {**info, "fold": fold, "parts": {
        part: {"images": int(r["count"]), "melanoma": int(r["sum"])} for part, r in counts.iterrows()}})


def _finished(member: RunFolder) -> bool:
    return member.metrics.is_file() and member.classifier.is_file()


def run_folds(config: Config, source: DataSource, run: RunFolder, stage: str, log: Log, resume: bool,
              hooks: Optional[Hooks]) -> dict:
    """Train the K members (stage 1 on every rank under torchrun, the rest on rank 0), then the ensemble.
    Every line goes to the ensemble's train.log; each member's stage 1 writes its own TensorBoard events."""
    hooks = hooks if hooks is not None else hooks_from_env()
    k = config.data.folds
    single = with_overrides(config, {"data.folds": 0})  # what each member is: one model
    encoders: dict[int, tuple] = {}
    with contextlib.ExitStack() as closing:
        with process_group(config.runtime.device) as d:
            say = closing.enter_context(session_log(run.train_log, log, stage, resume, d.main))
            prepared, device = prepare_run(config, source, run, stage, resume, d, say)
            folds = _fold_table(prepared, run, config, resume or stage == "classifier", d.main)
            info = run.run_info() if d.main else {}
            member_data = [member_prepared(prepared, folds, fold) for fold in range(k)]
            for fold, data in enumerate(member_data):
                member = run.fold(fold)
                if resume and _finished(member):
                    say(f"[Fold {fold + 1}/{k}] finished before: kept ({member.root})")
                    continue
                if d.main:
                    _write_member(member, single, data, info, fold)
                if stage in ("all", "siamese"):
                    say(f"[Fold {fold + 1}/{k}] {len(data.part('train'))} training images, {len(data.part('val'))} "
                        f"validating ({int(data.labels('val').sum())} melanoma)")
                    state = read_state(member) if resume and member.state().is_file() else None
                    with open_tracker(single.runtime.tensorboard if d.main else "off", member.tensorboard,
                                      state["epoch"] + 1 if state else 0) as tracker:
                        encoders[fold] = train_siamese(single, data, device, member, say, state, d,
                                                       tracker.hooks(hooks))
        if not d.main:
            return {}
        if stage == "siamese":
            for fold, (_, history) in encoders.items():
                report_stage1(single, member_data[fold], device, run.fold(fold), history)
            return {}
        return _finish(config, prepared, member_data, encoders, device, run, stage, say)


def _finish(config: Config, prepared: Prepared, member_data: list[Prepared], encoders: dict, device: torch.device,
            run: RunFolder, stage: str, log: Log) -> dict:
    """Rank 0: each member's stage 2 and evaluation (`member_data`: the data as each member sees it), the
    out-of-fold predictions, then the ensemble's."""
    from .evaluate import evaluate_run

    single, k = with_overrides(config, {"data.folds": 0}), config.data.folds
    members = [run.fold(fold) for fold in range(k)]
    for fold, (member, data) in enumerate(zip(members, member_data)):
        if fold in encoders:
            encoder, history = encoders[fold]
            report_stage1(single, data, device, member, history)
        elif stage == "classifier" or not _finished(member):
            encoder = load_model(member.siamese, "siamese")[0].to(device)
        else:
            continue
        log(f"[Fold {fold + 1}/{k}] stage 2 and evaluation")
        classifier, _ = train_classifier(single, encoder, data, log)
        save_model(classifier, member.classifier, kind_detail=single.classifier.kind)
        evaluate_run(member.root, single, data, device, lambda line: None)
    summary = _out_of_fold(run, members, config)
    _save_ensemble(run, members)
    run.write_json(run.baseline, _ensemble_baseline(members))
    run.write_json(run.folds_summary, summary)
    log(_summary_line(summary))
    with open_tracker(config.runtime.tensorboard, run.tensorboard) as tracker:
        return evaluate_run(run.root, config, prepared, device, log,
                            on_test=tracker.projector(prepared.array, config.runtime.seed))


def _out_of_fold(run: RunFolder, members: list[RunFolder], config: Config) -> dict:
    """oof_predictions.csv (each training image scored by the member that did not train on it) and the
    summary: out-of-fold ROC AUC with its patient-bootstrap interval, and each member's own results."""
    frames = []
    for fold, member in enumerate(members):
        predictions = pd.read_csv(member.predictions, dtype={"isic_id": str, "patient_id": str})
        frames.append(predictions[predictions["part"] == "val"].assign(fold=fold))
    oof = pd.concat(frames, ignore_index=True)
    oof = oof[["isic_id", "patient_id", "label", "fold", "prob_melanoma", "knn_prob_melanoma"]].rename(
        columns={"prob_melanoma": "score", "knn_prob_melanoma": "knn_score"})
    oof.to_csv(run.oof, index=False)
    y, score = oof["label"].to_numpy(), oof["score"].to_numpy()
    report = {"images": int(len(oof)), "melanoma": int(y.sum()),
              "roc_auc": binary_report(y, score, 0.5)["roc_auc"]}
    if config.evaluation.bootstrap and len(np.unique(y)) == 2:
        ci = bootstrap_ci(y, score, oof["patient_id"].to_numpy(), 0.5, config.evaluation.bootstrap,
                          config.runtime.seed)
        report.update({k: v for k, v in ci.items() if k.startswith("roc_auc_ci")})
    results = [member.read_metrics() for member in members]
    return {"k": len(members), "out_of_fold": report,
            "members": [{"fold": fold, "folder": str(member.root.relative_to(run.root)),
                         "val_roc_auc": metrics["val"]["roc_auc"], "test_roc_auc": metrics["test"]["roc_auc"]}
                        for fold, (member, metrics) in enumerate(zip(members, results))]}


def _save_ensemble(run: RunFolder, members: list[RunFolder]) -> None:
    """The members' encoders and classifiers as one encoder and one classifier: the run's models."""
    run.make()
    encoders = [load_model(m.siamese, "siamese")[0] for m in members]
    classifiers = [load_model(m.classifier, "classifier")[0] for m in members]
    save_model(EnsembleEncoder(encoders), run.siamese)
    save_model(EnsembleClassifier(classifiers), run.classifier, kind_detail="ensemble")


def _ensemble_baseline(members: list[RunFolder]) -> dict:
    """The ensemble's training cost is its members' together; the untrained-encoder yardstick is member 0's."""
    baselines = [m.read_baseline() or {} for m in members]
    return {"untrained_encoder_test_knn_auc": baselines[0].get("untrained_encoder_test_knn_auc"),
            "siamese_seconds": float(sum(b.get("siamese_seconds", 0.0) for b in baselines)),
            "backbone_image_passes": int(sum(b.get("backbone_image_passes", 0) for b in baselines)),
            "members": len(members)}


def _summary_line(summary: dict) -> str:
    oof = summary["out_of_fold"]
    members = ", ".join(f"{m['test_roc_auc']:.4f}" for m in summary["members"])
    return (f"[Folds] out-of-fold ROC AUC {oof['roc_auc']:.4f}{interval_text(oof, 'roc_auc', 4)} on {oof['images']} "
            f"training images; members' test ROC AUC: {members}; the ensemble's follows")
