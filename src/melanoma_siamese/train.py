"""A training run: validate data, split, run both stages, evaluate; what the run folder records."""
from __future__ import annotations

import contextlib
import json
import platform
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from . import plots
from .checkpoint import load_model, save_model
from .config import Config, dump_yaml
from .data.images import to_chw, train_transform
from .data.prepare import Prepared, apply_saved_split, assign_split, load_and_validate, write_split
from .data.split import fold_problems
from .distributed import Dist, process_group
from .engine import embed
from .errors import ConfigError, DataError
from .hooks import Hooks, hooks_from_env
from .metrics import knn_probabilities
from .models import Encoder, build_backbone
from .rng import seed_everything
from .runfolder import RunFolder, write_text_atomic
from .runtime import resolve_device
from .stage1 import label_of_rows, train_siamese, validation_reference
from .stage2 import train_classifier
from .tracking import open_tracker, session_log, summary_writer
from .train_state import read_state

Log = Callable[[str], None]


@dataclass(frozen=True)
class DataSource:
    data: Optional[Path] = None
    metadata: Optional[Path] = None
    images: Optional[Path] = None

    def as_dict(self) -> dict:
        return {k: str(Path(v).resolve()) if v is not None else None for k, v in vars(self).items()}


def load_source(config: Config, source: DataSource, progress: bool, log: Log) -> Prepared:
    """Read, decode (through the cache) and validate a data source as the configuration says."""
    return load_and_validate(source, config.data, max(1, config.runtime.num_workers) * 2, progress, log)


def run_info(config: Config, device: torch.device, source: DataSource, prepared: Prepared) -> dict:
    import pytorch_metric_learning
    import sklearn
    import torchvision

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                                text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    counts = prepared.table.groupby("part")["target"].agg(["count", "sum"])
    return {
        "command": sys.argv,
        "source": source.as_dict(),
        "layout": prepared.dataset.layout,
        "labels": prepared.dataset.labels_rule,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
        "git_commit": commit,
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "torchvision": torchvision.__version__, "pytorch_metric_learning": pytorch_metric_learning.__version__,
                     "scikit_learn": sklearn.__version__, "numpy": np.__version__},
        "parts": {part: {"images": int(r["count"]), "melanoma": int(r["sum"])} for part, r in counts.iterrows()},
        "skipped_images": int(len(prepared.skipped)),
        "dropped_duplicates": prepared.dataset.dropped_duplicates,
        "conversions": prepared.conversions,
    }


def untrained_test_knn_auc(config: Config, prepared: Prepared, device: torch.device) -> float:
    """kNN ROC AUC on the test part with a freshly initialised encoder: what training has to beat."""
    seed_everything(config.runtime.seed)
    encoder = Encoder(config.model.backbone, config.model.pretrained, config.model.embedding_dim).to(device)
    d = config.data
    ref_rows = validation_reference(prepared, config.siamese.val_reference_max, config.runtime.seed)
    row_label = label_of_rows(prepared)
    ref = embed(encoder, prepared.array, ref_rows, d.mean, d.std)
    test = embed(encoder, prepared.array, prepared.rows("test"), d.mean, d.std)
    probs = knn_probabilities(test, ref, np.array([row_label[r] for r in ref_rows]), config.evaluation.knn_k)
    return float(roc_auc_score(prepared.labels("test"), probs))


def write_history(history: list[dict], path: Path) -> None:
    path.write_text("".join(json.dumps(h) + "\n" for h in history))


def input_sample(config: Config, prepared: Prepared, path: Path) -> None:
    """An augmented sample exactly as the model sees it (de-normalised for display)."""
    d = config.data
    torch.manual_seed(config.runtime.seed)
    rows = prepared.part("train").groupby("target").head(4)
    transform = train_transform(d.image_size, d.mean, d.std, d.augment)
    images, titles = [], []
    for _, r in rows.iterrows():
        t = transform(to_chw(prepared.array[r["row"]]))
        images.append(((t * d.std + d.mean).clamp(0, 1).permute(1, 2, 0).numpy() * 255).astype(np.uint8))
        titles.append(f"{r['isic_id']}\n{'melanoma' if r['target'] else 'benign'}")
    plots.image_grid(np.stack(images), titles, path, f"Augmented training input ({d.image_size} px)")


def check_before_writing(config: Config, prepared: Prepared, source: DataSource, run: RunFolder) -> None:
    """What would stop a fresh run after its folder was written (and an earlier run there removed), checked
    first: the backbone and its weights, the folds' patients, TensorBoard where asked for, and no input inside
    the run's own files."""
    m = config.model
    inside = run.holding([source.data, source.metadata, source.images,
                          None if m.pretrained in ("none", "imagenet") else Path(m.pretrained)])
    if inside:
        raise ConfigError(f"--out {run.root}: {', '.join(map(str, inside))} lies inside the folder of the run it "
                          "would replace; give another --out")
    # Built once and dropped: an unknown name, or weights that cannot be had or do not fit, stop the run here
    # (stage 1 builds it again, seeded).
    build_backbone(m.backbone, m.pretrained, m.embedding_dim)
    if config.data.folds >= 2:
        problems = fold_problems(prepared.part("train"), config.data.folds, str(prepared.dataset.metadata_file))
        if problems:
            raise DataError(problems)
    summary_writer(config.runtime.tensorboard)


def prepare_run(config: Config, source: DataSource, run: RunFolder, stage: str, resume: bool, d: Dist, log: Log
             ) -> tuple[Prepared, torch.device]:
    """Read and validate the data, split it (or reapply the run's split), and write the run's description.
    Every rank splits alike (so the split is the single-process one); only rank 0 writes."""
    prepared = load_source(config, source, config.runtime.progress and d.main, log)
    if (stage == "classifier" or resume) and run.split.is_file():
        apply_saved_split(prepared, run.split)
    else:
        split_seed = config.data.split_seed if config.data.split_seed is not None else config.runtime.seed
        assign_split(prepared, config.data.val_fraction, config.data.test_fraction, split_seed,
                     config.data.train_melanoma_fraction)
    device = resolve_device(config.runtime.device)
    if d.enabled and device.type == "cuda":
        device = torch.device("cuda", d.local_rank)
    log(f"Device: {device}" + (f" (rank 0 of {d.world_size} processes)" if d.enabled else ""))
    fresh = stage in ("all", "siamese") and not resume
    if fresh:
        check_before_writing(config, prepared, source, run)
    info = run_info(config, device, source, prepared)
    info["world_size"] = d.world_size
    if d.main:
        # Only now, with every check passed, is the folder written to: a fresh run first removes what an earlier
        # run left there (cli's train refuses a folder holding one unless told --overwrite).
        if fresh and run.holds_run():
            run.clear()
        run.make()
        getattr(log, "start", lambda: None)()  # a TrainLog has held its lines until now (tracking.TrainLog)
        if len(prepared.skipped):
            prepared.skipped.to_csv(run.skipped_images, index=False)
            log(f"Skipped {len(prepared.skipped)} bad image(s); their ids and reasons: {run.skipped_images}")
        write_split(prepared, run.split)
        write_text_atomic(run.config, dump_yaml(config))
    parts = ", ".join(f"{k} {v['images']} ({v['melanoma']} melanoma)" for k, v in info["parts"].items())
    log(f"Data: {prepared.dataset.layout} layout, {len(prepared.table)} images; split by patient: {parts}")
    if d.main:
        run.write_json(run.run_json, info)
        input_sample(config, prepared, run.image("input_sample.png"))
    return prepared, device


def report_stage1(config: Config, prepared: Prepared, device: torch.device, run: RunFolder,
                   history: list[dict]) -> dict:
    """History, plots and the untrained-encoder baseline of stage 1 (rank 0)."""
    write_history(history, run.history("siamese"))
    plots.loss_curves(history[1:], run.image("siamese_loss.png"), "Stage 1: Siamese encoder")
    plots.validation_metrics(history, ("knn_auc", "precision_at_1", "map_at_r", "same_class_similarity",
                                       "other_class_similarity"), run.image("val_metrics.png"), config.siamese.monitor)
    kept = ([h for h in history if h.get("best")] or history)[-1]
    baseline = {"untrained_encoder_test_knn_auc": untrained_test_knn_auc(config, prepared, device),
                "siamese_seconds": history[-1].get("seconds", 0.0),
                "backbone_image_passes": history[-1]["images_seen"],
                # The card says how far stage 1 went and which epoch's weights the run uses.
                "epochs_run": history[-1]["epoch"], "kept_epoch": kept["epoch"], "monitor": config.siamese.monitor,
                "kept_value": kept.get(config.siamese.monitor)}
    run.write_json(run.baseline, baseline)
    return baseline


def run_train(config: Config, source: DataSource, run_dir: Path, stage: str = "all", log: Log = print,
              resume: bool = False, hooks: Optional[Hooks] = None) -> dict:
    """Validate data, split, train the requested stage(s), evaluate; return the metrics.

    Under torchrun every rank trains its share of each stage-1 batch; the process group ends on every
    way out of stage 1, and only rank 0 writes files, prints, and runs stage 2 and the evaluation.
    `hooks` (fault injection, tracing) default to those the environment asks for (hooks.hooks_from_env).
    Every line logged also goes to RUN/train.log; TensorBoard events to RUN/tensorboard (tracking.py).
    """
    from .evaluate import evaluate_run

    run = RunFolder(run_dir)
    hooks = hooks if hooks is not None else hooks_from_env()
    encoder, history = None, None
    with contextlib.ExitStack() as closing:
        with process_group(config.runtime.device) as d:
            trains_encoder = stage in ("all", "siamese")
            log = closing.enter_context(session_log(run.train_log, log, stage, resume, d.main))
            resume_state = read_state(run) if resume and trains_encoder else None
            purge_from = (resume_state["epoch"] + 1 if resume_state else 0) if trains_encoder else None
            prepared, device = prepare_run(config, source, run, stage, resume, d, log)
            tracker = closing.enter_context(open_tracker(config.runtime.tensorboard if d.main else "off",
                                                         run.tensorboard, purge_from))
            if trains_encoder:
                encoder, history = train_siamese(config, prepared, device, run, log, resume_state, d,
                                                 tracker.hooks(hooks))
        if not d.main:
            return {}
        if encoder is None:
            encoder, _ = load_model(run.siamese, "siamese")
            encoder.to(device)
        else:
            baseline = report_stage1(config, prepared, device, run, history)
            if stage == "siamese":
                return {"baseline": baseline}
        classifier, cls_history = train_classifier(config, encoder, prepared, log)
        save_model(classifier, run.classifier, kind_detail=config.classifier.kind)
        write_history(cls_history, run.history("classifier"))
        tracker.scalars("classifier", cls_history)
        if cls_history:
            plots.loss_curves(cls_history, run.image("classifier_loss.png"), "Stage 2: classifier",
                              extra=("val_acc",))
        return evaluate_run(run.root, config, prepared, device, log,
                            on_test=tracker.projector(prepared.array, config.runtime.seed))
