"""Fixtures for the evaluation tests: a tiny base, a toy task, and one adapter trained on it per session."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "training"))

from eval_helpers import TrainedRun, train_toy_adapter
from train_helpers import build_tiny_base


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    return build_tiny_base(tmp_path_factory.mktemp("eval_base"))


@pytest.fixture(scope="session")
def trained(tiny_base, tmp_path_factory) -> TrainedRun:
    """An adapter trained 12 steps to answer every prompt with ' omega', with its config and data."""
    return train_toy_adapter(tiny_base, tmp_path_factory.mktemp("eval_run"))


@pytest.fixture(scope="module", autouse=True)
def _one_thread_for_tiny_models(single_thread):
    """Tiny models: one thread is faster than two fighting over small matmuls (restored after each module)."""
    yield
