"""Seeding, and capturing/restoring every random stream a training step touches (for exact resume)."""
from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    from pytorch_metric_learning.utils import common_functions

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    # The metric-learning library draws from its own module-level generator; seed it from the run's seed.
    common_functions.NUMPY_RANDOM = np.random.RandomState(seed)


def rng_state() -> dict:
    """Every random stream a training step touches, as plain types that load with weights_only=True."""
    from pytorch_metric_learning.utils import common_functions

    def numpy_state(state) -> dict:
        name, keys, pos, has_gauss, gauss = state
        return {"keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                "has_gauss": int(has_gauss), "gauss": float(gauss)}

    version, internal, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": numpy_state(np.random.get_state()),
        "pml": numpy_state(common_functions.NUMPY_RANDOM.get_state()),
        "python": {"version": version, "internal": list(internal), "gauss": gauss},
    }


def set_rng_state(state: dict) -> None:
    from pytorch_metric_learning.utils import common_functions

    def numpy_state(s: dict):
        return ("MT19937", s["keys"].numpy().astype(np.uint32), s["pos"], s["has_gauss"], s["gauss"])

    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    np.random.set_state(numpy_state(state["numpy"]))
    generator = np.random.RandomState()
    generator.set_state(numpy_state(state["pml"]))
    common_functions.NUMPY_RANDOM = generator
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss"]))
