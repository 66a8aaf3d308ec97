"""Weight files a backbone starts from: reading one as a state dict, and saying what keeps it from fitting a model
(torchvision's backbones in models.py, timm's in timm_backbone.py)."""
from __future__ import annotations

from pathlib import Path

import torch

from .errors import WeightsError


def load_state_dict_file(path: Path) -> dict:
    if not path.is_file():
        raise WeightsError(f"model.pretrained: weights file {path} does not exist; expected a torchvision state "
                           "dict file, 'imagenet' or 'none'")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(f"weights file {path} cannot be loaded as a state dict: {exc}") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise WeightsError(f"weights file {path} holds a {type(state).__name__}, not a state dict")
    return state


def state_dict_problems(state: dict, expected: dict) -> list[str]:
    """What keeps `state` from loading into a model whose state dict is `expected` (empty when it fits)."""
    unexpected = [k for k in state if k not in expected]
    missing = [k for k in expected if k not in state]
    wrong_shape = [k for k in state if k in expected and tuple(state[k].shape) != tuple(expected[k].shape)]
    problems = []
    if missing:
        problems.append(f"missing keys {missing[:5]}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected[:5]}")
    if wrong_shape:
        problems.append(f"keys of another shape {wrong_shape[:5]}")
    return problems
