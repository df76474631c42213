"""Fixtures for the training tests: one tiny base model and dataset per session."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from train_helpers import build_tiny_base, make_rows, write_config, write_jsonl


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    return build_tiny_base(tmp_path_factory.mktemp("tiny_base"))


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("tiny_data")
    write_jsonl(directory / "train.jsonl", make_rows(48, seed=1))
    write_jsonl(directory / "eval.jsonl", make_rows(12, seed=2))
    return directory


@pytest.fixture
def make_config(tiny_base, tiny_data, tmp_path):
    """make_config(name="run", **train_overrides) -> (config path, output dir)."""

    def make(name: str = "run", **train):
        output_dir = tmp_path / name
        return write_config(tmp_path / f"{name}.yaml", tiny_base, tiny_data, output_dir, **train), output_dir

    return make


@pytest.fixture(scope="module", autouse=True)
def _one_thread_for_tiny_models(single_thread):
    """Tiny models: one thread is faster than two fighting over small matmuls (restored after each module)."""
    yield
