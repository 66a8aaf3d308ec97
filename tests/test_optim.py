"""optim.py: which parameters weight decay reaches (siamese.decay_norm_and_bias) and each group's learning rate."""
import pytest
import torch
from torch import nn

from melanoma_siamese.config import SiameseConfig
from melanoma_siamese.optim import build_optimizer, encoder_optimizer


class TinyEncoder(nn.Module):
    """A conv (no bias) and a BatchNorm as the "backbone", a Linear with bias as the new layer."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 2)

    def new_parameters(self) -> list[nn.Parameter]:
        return list(self.fc.parameters())


def _config(everything: bool, optimizer: str = "adamw") -> SiameseConfig:
    return SiameseConfig(optimizer=optimizer, lr=1e-3, backbone_lr_scale=0.1, weight_decay=0.05,
                         decay_norm_and_bias=everything)


def _groups(opt: torch.optim.Optimizer) -> list[tuple[set[int], float, float]]:
    return [({id(p) for p in g["params"]}, g["lr"], g["weight_decay"]) for g in opt.param_groups]


def _decayed(opt: torch.optim.Optimizer) -> set[int]:
    return {i for ids, _, wd in _groups(opt) if wd > 0 for i in ids}


def _ids(*params) -> set[int]:
    return {id(p) for p in params}


@pytest.mark.parametrize("optimizer", ["adamw", "adam"])
def test_default_decays_only_matrices_and_kernels(optimizer):
    enc = TinyEncoder()
    scale = nn.Parameter(torch.ones(()))  # a loss parameter (0-d), e.g. a learned temperature
    opt = encoder_optimizer(_config(False, optimizer), enc, [scale])
    assert _decayed(opt) == _ids(enc.conv.weight, enc.fc.weight)
    every = {i for ids, _, _ in _groups(opt) for i in ids}
    assert every == _ids(*enc.parameters(), scale)  # nothing lost, nothing twice
    assert sum(len(ids) for ids, _, _ in _groups(opt)) == len(every)
    by_param = {i: (lr, wd) for ids, lr, wd in _groups(opt) for i in ids}
    assert by_param[id(enc.conv.weight)] == pytest.approx((1e-4, 0.05))
    assert by_param[id(enc.bn.weight)] == pytest.approx((1e-4, 0.0))
    assert by_param[id(enc.bn.bias)] == pytest.approx((1e-4, 0.0))
    assert by_param[id(enc.fc.weight)] == pytest.approx((1e-3, 0.05))
    assert by_param[id(enc.fc.bias)] == pytest.approx((1e-3, 0.0))
    assert by_param[id(scale)] == pytest.approx((1e-3, 0.0))
    assert isinstance(opt, torch.optim.AdamW if optimizer == "adamw" else torch.optim.Adam)


def test_decay_norm_and_bias_decays_every_parameter():
    enc = TinyEncoder()
    scale = nn.Parameter(torch.ones(()))
    opt = encoder_optimizer(_config(True), enc, [scale])
    assert _decayed(opt) == _ids(*enc.parameters(), scale)
    # One decayed group per learning rate; the empty no-decay groups are left out.
    groups = sorted(_groups(opt), key=lambda g: g[1])
    assert len(groups) == 2
    (backbone, lr_b, wd_b), (new, lr_n, wd_n) = groups
    assert backbone == _ids(enc.conv.weight, enc.bn.weight, enc.bn.bias) and (lr_b, wd_b) == pytest.approx((1e-4, 0.05))
    assert new == _ids(enc.fc.weight, enc.fc.bias, scale) and (lr_n, wd_n) == pytest.approx((1e-3, 0.05))


def test_build_optimizer_splits_backbone_and_new_at_their_rates():
    enc = TinyEncoder()
    backbone = [enc.conv.weight, enc.bn.weight, enc.bn.bias]
    opt = build_optimizer(_config(False), backbone, enc.new_parameters())
    groups = _groups(opt)
    assert (_ids(enc.conv.weight), pytest.approx(1e-4), pytest.approx(0.05)) in groups
    assert (_ids(enc.bn.weight, enc.bn.bias), pytest.approx(1e-4), 0.0) in groups
    assert (_ids(enc.fc.weight), pytest.approx(1e-3), pytest.approx(0.05)) in groups
    assert (_ids(enc.fc.bias), pytest.approx(1e-3), 0.0) in groups
    assert len(groups) == 4


@pytest.mark.parametrize("everything", [False, True])
def test_one_adamw_step_with_zero_gradients(everything):
    """With zero gradients Adam's update is zero, so an AdamW step changes only what it decays, by lr x wd."""
    torch.manual_seed(0)
    enc = TinyEncoder()
    with torch.no_grad():
        enc.fc.bias.fill_(1.0)
    before = {n: p.detach().clone() for n, p in enc.named_parameters()}
    opt = encoder_optimizer(_config(everything), enc, [])
    for p in enc.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    # Decayed weights shrink by the factor 1 - lr x weight_decay of their group.
    torch.testing.assert_close(enc.fc.weight.detach(), before["fc.weight"] * (1 - 1e-3 * 0.05))
    torch.testing.assert_close(enc.conv.weight.detach(), before["conv.weight"] * (1 - 1e-4 * 0.05))
    if everything:
        torch.testing.assert_close(enc.fc.bias.detach(), before["fc.bias"] * (1 - 1e-3 * 0.05))
        assert not torch.equal(enc.fc.bias.detach(), before["fc.bias"])
    else:
        assert torch.equal(enc.fc.bias.detach(), before["fc.bias"])
        assert torch.equal(enc.bn.weight.detach(), before["bn.weight"])
        assert torch.equal(enc.bn.bias.detach(), before["bn.bias"])
