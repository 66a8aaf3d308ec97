"""The named parts of stage 1: runtime, optimizer, training state, batch sources, hooks."""
import signal

import numpy as np
import pytest
import torch

from melanoma_siamese.batches import DeviceBatches, SampleBatches, TripletBatches, make_batch_source
from melanoma_siamese.checkpoint import CheckpointError
from melanoma_siamese.config import Config, RuntimeConfig, with_overrides
from melanoma_siamese.errors import ConfigError, Interrupted
from melanoma_siamese.hooks import EpochEnd, hooks_from_env, trace_to
from melanoma_siamese.models import Encoder
from melanoma_siamese.objective import make_objective
from melanoma_siamese.optim import encoder_optimizer
from melanoma_siamese.runfolder import RunFolder
from melanoma_siamese.runtime import precision_for, resolve_device, stop_on_signals
from melanoma_siamese.train_state import Progress, Trainables, load_best, read_state, restore_state, save_best, save_state

CPU = torch.device("cpu")


def _config(**overrides) -> Config:
    base = {"data.image_size": 32, "siamese.batch_size": 8, "runtime.num_workers": 0, "model.backbone": "resnet18",
            "model.pretrained": "none", "model.embedding_dim": 16}
    return with_overrides(Config(), {**base, **overrides})


def _data(n=40):
    rng = np.random.default_rng(0)
    return rng.integers(0, 255, (n, 32, 32, 3), dtype=np.uint8), np.arange(n), (np.arange(n) % 4 == 0).astype(int)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_asking_for_cuda_without_it_is_a_configuration_error():
    with pytest.raises(ConfigError, match="--device cpu"):
        resolve_device("cuda")


def test_precision_off_is_a_plain_step():
    p = precision_for(RuntimeConfig(), CPU)
    assert p.dtype is None and not p.channels_last and p.scaler.state_dict() == {} and p.name == "fp32"
    w = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([w], lr=0.5)
    with p.autocast():
        loss = (w * 2).sum()
    p.step(loss, opt)
    assert torch.equal(w.detach(), torch.zeros(2))


def test_signal_sets_the_stop_flag_and_handlers_come_back():
    before = signal.getsignal(signal.SIGTERM)
    with stop_on_signals() as stop:
        stop.check()
        signal.raise_signal(signal.SIGTERM)
        with pytest.raises(Interrupted):
            stop.check()
    assert signal.getsignal(signal.SIGTERM) is before


def test_norm_and_bias_parameters_are_not_decayed():
    config = _config(**{"siamese.weight_decay": 0.01, "siamese.backbone_lr_scale": 0.1, "siamese.ce_weight": 1.0})
    encoder = Encoder("resnet18", "none", 16, ce_head=True)
    opt = encoder_optimizer(config.siamese, encoder, [])
    decay = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    named = dict(encoder.named_parameters())
    assert all(id(p) not in decay for n, p in named.items() if n.endswith("bias") or "bn" in n)
    assert all(id(p) in decay for n, p in named.items() if p.ndim > 1)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(named)
    lrs = {g["lr"] for g in opt.param_groups}
    assert lrs == {config.siamese.lr, config.siamese.lr * 0.1}


def _parts(config):
    encoder = Encoder("resnet18", "none", 16)
    objective = make_objective(config, np.array([0, 1]), CPU)
    opt = encoder_optimizer(config.siamese, encoder, objective.parameters())
    return Trainables(encoder, objective, opt, None, precision_for(config.runtime, CPU).scaler)


def test_state_holds_no_best_weights_and_restores(tmp_path):
    config, run = _config(), RunFolder(tmp_path)
    torch.manual_seed(0)
    parts = _parts(config)
    progress = Progress(history=[{"epoch": 0}], images_seen=80)
    progress.record(1, 0.7, progress.improves(0.7, lower_is_better=False))
    save_best(run, parts.encoder, progress, "knn_auc")
    save_state(run, progress, parts)
    state = read_state(run)
    assert set(state["best"]) == {"value", "epoch", "waited"}  # the best weights live in models/siamese.pth alone
    fresh = _parts(config)
    restored = restore_state(state, fresh)
    assert (restored.best_epoch, restored.best_value, restored.images_seen) == (1, 0.7, 80)
    assert all(torch.equal(a, b) for a, b in zip(parts.encoder.state_dict().values(),
                                                 fresh.encoder.state_dict().values()))
    other = Encoder("resnet18", "none", 16)
    load_best(run, other, restored)
    assert all(torch.equal(a, b) for a, b in zip(parts.encoder.state_dict().values(), other.state_dict().values()))
    restored.best_epoch = 2
    with pytest.raises(CheckpointError, match="best epoch is 2"):
        load_best(run, other, restored)


@pytest.mark.parametrize("overrides,kind,passes", [
    ({"siamese.mining": "sampled", "siamese.loss": "triplet"}, TripletBatches, 3),
    ({"siamese.mining": "multi_similarity", "siamese.loss": "multi_similarity"}, DeviceBatches, 1),
    ({"siamese.mining": "multi_similarity", "siamese.loss": "multi_similarity", "runtime.batch_augment": False},
     SampleBatches, 1)])
def test_batch_source_factory_and_pure_epochs(overrides, kind, passes):
    config = _config(**overrides)
    array, rows, labels = _data()
    first, second = (make_batch_source(config, array, rows, labels, CPU) for _ in range(2))
    assert type(first) is kind and first.passes_per_image == passes
    a, b = list(first.epoch(3)), list(second.epoch(3))
    assert len(a) == 40 // 8 and all(torch.equal(x[0], y[0]) for x, y in zip(a, b))
    images, y = a[0]
    assert images.shape == (8 * passes, 3, 32, 32)
    assert (y is None) == (passes == 3)
    if y is not None:
        assert int(y.sum()) == 4  # class-balanced
    assert len(first.epoch_rows) == 8 * 5 * passes
    assert not torch.equal(a[0][0], list(first.epoch(4))[0][0])


def test_hooks_from_the_environment(tmp_path):
    hooks = hooks_from_env({"MELANOMA_SIAMESE_FAULT_AT": "2:1:SIGUSR1", "MELANOMA_SIAMESE_TRACE": str(tmp_path)})
    seen = []
    previous = signal.signal(signal.SIGUSR1, lambda *a: seen.append(1))
    try:
        hooks.batch_hook(1)(1)
        hooks.batch_hook(2)(0)
        assert seen == []
        hooks.batch_hook(2)(1)
        assert seen == [1]
    finally:
        signal.signal(signal.SIGUSR1, previous)
    hooks.epoch_end(EpochEnd(1, 0, 1, np.array([3, 4]), Encoder("resnet18", "none", 16)))
    assert (tmp_path / "rank0_epoch1.json").is_file()
    assert hooks_from_env({}).on_batch is None and hooks_from_env({}).on_epoch_end is None
    assert callable(trace_to(tmp_path))
