"""Every config in examples/ validates with the real loader and with `nibbletune train --check`."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from nibbletune.cli.main import main
from nibbletune.training.config import load_config

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.yaml"))


def test_examples_exist():
    names = {path.name for path in EXAMPLES}
    assert {"train_full.yaml", "llama-3.1-8b-gpu.yaml"} <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda path: path.name)
def test_example_validates(path, capsys):
    config = load_config(path)
    # every key the file sets is kept, none is silently dropped or renamed
    written = yaml.safe_load(path.read_text())
    dumped = config.model_dump(mode="json")
    for section, values in written.items():
        if isinstance(values, dict):
            for key, value in values.items():
                assert dumped[section][key] == value, f"{path.name}: {section}.{key}"
        else:
            assert dumped[section] == values
    assert main(["train", str(path), "--check"]) == 0
    assert yaml.safe_load(capsys.readouterr().out) == dumped


def test_gpu_example_is_a_24gb_recipe():
    config = load_config(Path(EXAMPLES[0]).parent / "llama-3.1-8b-gpu.yaml")
    assert config.data.format == "chat"
    assert config.train.gradient_checkpointing and config.train.seq_len == 2048
    assert config.train.micro_batch_size * config.train.grad_accum == 16
    assert config.lora.target_modules == "all-linear" and config.quant.compute_dtype == "auto"
