"""Run logs and tracking: train.log, TensorBoard scalars and projector, progress bars off a terminal."""
import io
import json
import re
import sys
from datetime import datetime

import numpy as np
import pandas as pd
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tqdm import tqdm

from melanoma_siamese.cli import main
from melanoma_siamese.config import load_config
from melanoma_siamese.errors import ConfigError
from melanoma_siamese.folds import run_training
from melanoma_siamese.hooks import Hooks
from melanoma_siamese.options import config_path
from melanoma_siamese.runfolder import RunFolder
from melanoma_siamese.train import DataSource
from melanoma_siamese.progress import bar_disable
from melanoma_siamese.tracking import (TrainLog, open_tracker, projector_metadata, projector_positions,
                                       thumbnails)

from helpers import TINY, set_args

# Two optimizer steps an epoch: what is tested here is what the run records, not what it learns.
SHORT = list(TINY) + ["siamese.epoch_images=32"]
STAMPED = re.compile(r"^(\S+) (.*)$")
STAGE1_SCALARS = ("train_loss", "val_loss", "knn_auc", "precision_at_1", "map_at_r", "same_class_similarity",
                  "other_class_similarity")


class Interrupted(Exception):
    pass


def _interrupt_at(epoch: int):
    def hook(at_epoch: int, index: int) -> None:
        if at_epoch == epoch:
            raise Interrupted(f"stopped before epoch {epoch}")
    return hook


def _scalars(folder) -> EventAccumulator:
    accumulator = EventAccumulator(str(folder))
    accumulator.Reload()
    return accumulator


@pytest.fixture(scope="module")
def resumed_run(tiny_data, tmp_path_factory):
    """A 2-epoch run stopped by an exception before epoch 2 (the state of epoch 1 saved), then resumed."""
    out = tmp_path_factory.mktemp("tracking") / "run"
    config = load_config(config_path(None), SHORT)
    with pytest.raises(Interrupted):
        run_training(config, DataSource(data=tiny_data), out, log=lambda line: None,
                     hooks=Hooks(on_batch=_interrupt_at(2)))
    first = (out / "train.log").read_text()
    assert main(["train", "--resume", str(out)]) == 0
    return RunFolder(out), first


def test_train_log_holds_every_printed_line_time_stamped(resumed_run):
    run, _ = resumed_run
    lines = run.train_log.read_text().splitlines()
    for line in lines:
        stamp = STAMPED.match(line).group(1)
        assert datetime.fromisoformat(stamp).tzinfo is not None, line
    texts = [STAMPED.match(line).group(2) for line in lines]
    assert texts[0] == "=== train started"
    assert any(t.startswith("[Siamese] Epoch 1/2 train_loss=") for t in texts)
    assert any(t.startswith("[CLS] Epoch 1/") for t in texts)
    assert any(t.startswith("--- Test, natural prevalence (classifier):") for t in texts)  # evaluation's too


def test_a_resumed_run_appends_after_a_line_saying_so(resumed_run):
    run, first = resumed_run
    text = run.train_log.read_text()
    assert text.startswith(first)  # what the interrupted session printed is kept as it was
    later = [STAMPED.match(line).group(2) for line in text[len(first):].splitlines()]
    assert later[0] == "=== train resumed"
    assert any(t.startswith("[Siamese] resumed after epoch 1") for t in later)
    assert any(t.startswith("[Siamese] Epoch 2/2") for t in later)
    assert not any(t.startswith("[Siamese] Epoch 2/2") for t in first.splitlines())


def test_events_hold_each_epochs_scalars_once(resumed_run):
    run, _ = resumed_run
    assert len(list(run.tensorboard.glob("events.out.tfevents.*"))) == 2  # one per session
    accumulator = _scalars(run.tensorboard)
    tags = accumulator.Tags()["scalars"]
    for name in STAGE1_SCALARS:
        assert f"siamese/{name}" in tags
    history = [json.loads(line) for line in run.history("siamese").read_text().splitlines()]
    events = accumulator.Scalars("siamese/knn_auc")
    assert [e.step for e in events] == [0, 1, 2]  # the untrained encoder, then each epoch, none twice
    assert [e.value for e in events] == pytest.approx([h["knn_auc"] for h in history])
    assert [e.step for e in accumulator.Scalars("siamese/train_loss")] == [1, 2]
    classifier = pd.read_json(run.history("classifier"), lines=True)
    assert [e.value for e in accumulator.Scalars("classifier/val_loss")] == pytest.approx(classifier["val_loss"])


def test_the_projector_shows_the_test_embedding_with_thumbnails_and_labels(resumed_run):
    run, _ = resumed_run
    config = (run.tensorboard / "projector_config.pbtxt").read_text()
    folder = run.tensorboard / re.search(r'metadata_path: "([^"]+)/metadata.tsv"', config).group(1)
    assert "single_image_dim: 32" in config and (folder / "sprite.png").is_file()
    metadata = pd.read_csv(folder / "metadata.tsv", sep="\t", dtype={"isic_id": str})
    split = run.read_split()
    test = split[split["part"] == "test"]
    assert list(metadata.columns) == ["label", "isic_id", "patient_id", "prob_melanoma"]
    assert sorted(metadata["isic_id"]) == sorted(test["isic_id"])
    expected = dict(zip(test["isic_id"], np.where(test["target"] == 1, "melanoma", "benign")))
    assert (metadata["label"] == metadata["isic_id"].map(expected)).all()
    predictions = pd.read_csv(run.predictions, dtype={"isic_id": str}).set_index("isic_id")["prob_melanoma"]
    assert metadata["prob_melanoma"].to_numpy() == pytest.approx(
        metadata["isic_id"].map(predictions).to_numpy(), abs=1e-4)
    vectors = np.loadtxt(folder / "tensors.tsv", delimiter="\t")
    assert vectors.shape == (len(test), run.read_config().model.embedding_dim)
    assert np.linalg.norm(vectors, axis=1) == pytest.approx(1.0, abs=1e-3)


def test_without_tensorboard_the_run_trains_and_writes_no_events(tiny_data, tmp_path, monkeypatch):
    for name in ("tensorboard", "torch.utils.tensorboard"):
        monkeypatch.setitem(sys.modules, name, None)
    out = tmp_path / "run"
    assert main(["train", "--data", str(tiny_data), "--out", str(out), "--stage", "siamese",
                 *set_args(SHORT), "--set", "siamese.epochs=1"]) == 0
    assert (out / "models" / "siamese.pth").is_file() and "[Siamese] Epoch 1/1" in (out / "train.log").read_text()
    assert not (out / "tensorboard").exists()


def test_tensorboard_on_without_the_extra_is_refused_by_name(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ConfigError, match=r"runtime.tensorboard=on.*melanoma-siamese\[track\]"):
        open_tracker("on", tmp_path / "tb")
    assert not open_tracker("auto", tmp_path / "tb").enabled
    assert not open_tracker("off", tmp_path / "tb").enabled and not (tmp_path / "tb").exists()


def test_a_resumed_session_hides_what_the_earlier_one_wrote_past_the_saved_epoch(tmp_path):
    with open_tracker("on", tmp_path, 0) as tracker:  # crashed after writing epoch 2, state saved at 1
        tracker.scalars("siamese", [{"epoch": e, "loss": 10.0 + e, "best": True} for e in range(3)])
    with open_tracker("on", tmp_path, 2) as tracker:
        tracker.scalars("siamese", [{"epoch": e, "loss": 20.0 + e} for e in range(4)])  # history from 0
    events = _scalars(tmp_path).Scalars("siamese/loss")
    assert [(e.step, e.value) for e in events] == [(0, 10.0), (1, 11.0), (2, 22.0), (3, 23.0)]
    assert "siamese/best" not in _scalars(tmp_path).Tags()["scalars"]


def test_train_log_stamps_each_line_of_a_multi_line_message_and_starts_afresh(tmp_path):
    printed = []
    path = tmp_path / "run" / "train.log"
    (tmp_path / "run").mkdir()
    path.write_text("an older run's log\n")
    log = TrainLog(path, printed.append)
    log("one\ntwo")
    assert printed == ["one\ntwo"]
    assert path.read_text() == "an older run's log\n"  # held until the run's folder is written to
    log.start()
    log("after")
    lines = path.read_text().splitlines()
    assert [STAMPED.match(line).group(2) for line in lines] == ["=== train started", "one", "two", "after"]
    continued = TrainLog(path, printed.append, "continued")
    continued.start()
    continued("three")
    assert [STAMPED.match(line).group(2) for line in path.read_text().splitlines()[4:]] == [
        "=== train continued", "three"]
    with pytest.raises(ValueError, match="'paused' is not one of started, resumed, continued"):
        TrainLog(path, printed.append, "paused")


def test_train_log_records_the_error_that_stopped_a_run_and_nothing_for_a_refused_one(tmp_path):
    from melanoma_siamese.errors import DataError, WeightsError

    refused, stopped = tmp_path / "refused" / "train.log", tmp_path / "stopped" / "train.log"
    with pytest.raises(DataError):
        with TrainLog(refused, lambda line: None) as log:
            log("Labels: ...")
            raise DataError("train-metadata.csv: no column 'target'")
    assert not refused.parent.exists()
    with pytest.raises(WeightsError):
        with TrainLog(stopped, lambda line: None) as log:
            log.start()
            log("[Siamese] Epoch 1/2")
            raise WeightsError("weights file x.pth does not fit")
    texts = [STAMPED.match(line).group(2) for line in stopped.read_text().splitlines()]
    assert texts == ["=== train started", "[Siamese] Epoch 1/2", "=== stopped by WeightsError: weights file x.pth does not fit"]


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("wanted, stream, shown", [(True, _Terminal(), True), (True, io.StringIO(), False),
                                                   (False, _Terminal(), False), (False, io.StringIO(), False)],
                         ids=["wanted-terminal", "wanted-redirected", "off-terminal", "off-redirected"])
def test_progress_bars_show_only_when_wanted_and_on_a_terminal(wanted, stream, shown):
    bar = tqdm(range(3), file=stream, disable=bar_disable(wanted))
    assert bar.disable is not shown
    list(bar)  # iterating closes the bar (and so disables it)
    assert ("3/3" in stream.getvalue()) is shown


def test_projector_positions_keep_small_tables_and_draw_a_seeded_ordered_sample():
    assert list(projector_positions(10, 10, 0)) == list(range(10))
    drawn = projector_positions(10, 4, 0)
    assert len(drawn) == 4 == len(set(drawn)) and list(drawn) == sorted(drawn)
    assert list(drawn) == list(projector_positions(10, 4, 0))


def test_projector_metadata_with_and_without_scores_and_thumbnails_in_unit_range():
    table = pd.DataFrame({"isic_id": ["a", "b"], "patient_id": ["p", "q"], "target": [1, 0], "row": [0, 1]})
    header, rows = projector_metadata(table)
    assert header == ["label", "isic_id", "patient_id"] and rows == [["melanoma", "a", "p"], ["benign", "b", "q"]]
    header, rows = projector_metadata(table.assign(prob_melanoma=[0.91234, 0.1]))
    assert header[-1] == "prob_melanoma" and [r[-1] for r in rows] == ["0.9123", "0.1000"]
    array = np.zeros((2, 64, 64, 3), dtype=np.uint8)
    array[1] = 255
    thumbs = thumbnails(array, np.array([1, 0]), size=8)
    assert thumbs.shape == (2, 3, 8, 8) and torch.equal(thumbs[0], torch.ones(3, 8, 8))
    assert torch.equal(thumbs[1], torch.zeros(3, 8, 8))


@pytest.mark.slow
def test_folds_log_to_the_ensembles_train_log_and_each_member_writes_its_events(tiny_data, tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--data", str(tiny_data), "--out", str(out), "--stage", "siamese", "--folds", "2",
                 *set_args(SHORT), "--set", "siamese.epochs=1"]) == 0
    texts = [STAMPED.match(line).group(2) for line in (out / "train.log").read_text().splitlines()]
    for fold in (1, 2):
        start = next(i for i, t in enumerate(texts) if t.startswith(f"[Fold {fold}/2] "))
        assert texts[start + 1].startswith("[Siamese] untrained encoder")
        assert texts[start + 2].startswith("[Siamese] Epoch 1/1 train_loss=")
    for member in (RunFolder(out).fold(0), RunFolder(out).fold(1)):
        assert [e.step for e in _scalars(member.tensorboard).Scalars("siamese/map_at_r")] == [0, 1]
        assert not member.train_log.exists()
