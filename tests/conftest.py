"""Shared fixtures: an isolated image cache and a tiny generated dataset. Helpers are in helpers.py."""
from __future__ import annotations

from pathlib import Path

import pytest

from melanoma_siamese.data.synth import make_synthetic_dataset


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("MELANOMA_SIAMESE_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    return make_synthetic_dataset(tmp_path_factory.mktemp("tiny") / "data", n_images=160, size=32, seed=1)
