"""Config errors are one line naming the dotted key and what is allowed, raised before any work."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from nibbletune.errors import NibbletuneError
from nibbletune.training.config import (
    ConfigError,
    TrainConfig,
    check_against_model,
    describe_keys,
    load_config,
    parse_override,
)

BASE = {
    "model": "some/model",
    "data": {"path": "train.jsonl"},
    "output_dir": "out",
    "train": {"max_steps": 10},
}


def write(tmp_path: Path, raw: dict) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def error_for(tmp_path, raw, overrides=()) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, raw), list(overrides))
    message = str(info.value)
    assert "\n" not in message
    assert isinstance(info.value, NibbletuneError)
    return message


def test_minimal_config_fills_defaults(tmp_path):
    config = load_config(write(tmp_path, BASE))
    assert config.lora.r == 16 and config.quant.type == "nf4" and config.train.scheduler == "cosine"


def test_unknown_key_names_dotted_key_and_allowed(tmp_path):
    message = error_for(tmp_path, {**BASE, "train": {"max_steps": 1, "learning_rate": 1e-4}})
    assert "'train.learning_rate'" in message and "unknown" in message and "lr" in message


def test_unknown_top_level_key(tmp_path):
    assert "'modle'" in error_for(tmp_path, {**BASE, "modle": "x"})


def test_wrong_type(tmp_path):
    message = error_for(tmp_path, {**BASE, "train": {"max_steps": "many"}})
    assert "'train.max_steps'" in message and "integer" in message


@pytest.mark.parametrize("r", [0, -4])
def test_rank_must_be_positive(tmp_path, r):
    message = error_for(tmp_path, {**BASE, "lora": {"r": r}})
    assert "'lora.r'" in message and "greater than 0" in message


def test_bad_choice_lists_allowed(tmp_path):
    message = error_for(tmp_path, {**BASE, "train": {"max_steps": 1, "optimizer": "sgd"}})
    assert "'train.optimizer'" in message and "adamw8bit" in message


def test_steps_or_epochs(tmp_path):
    assert "max_steps" in error_for(tmp_path, {**BASE, "train": {"max_steps": 5, "epochs": 1}})
    assert "max_steps" in error_for(tmp_path, {**BASE, "train": {}})


def test_seq_len_over_model_limit():
    config = TrainConfig.model_validate({**BASE, "train": {"max_steps": 1, "seq_len": 4096}})

    class ModelConfig:
        max_position_embeddings = 2048

    with pytest.raises(ConfigError, match=r"'train.seq_len' is 4096 .* at most 2048"):
        check_against_model(config, ModelConfig())


def test_overrides_parse_yaml_scalars(tmp_path):
    config = load_config(write(tmp_path, BASE), ["train.lr=1e-4", "lora.r=8", "train.packing=true",
                                                 "lora.target_modules=[q_proj, v_proj]", "data.eval_path=ev.jsonl"])
    assert config.train.lr == 1e-4 and config.lora.r == 8 and config.train.packing is True
    assert config.lora.target_modules == ["q_proj", "v_proj"] and config.data.eval_path == "ev.jsonl"


def test_lr_written_without_dot_in_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(BASE) + "")
    path.write_text(path.read_text().replace("max_steps: 10", "max_steps: 10\n  lr: 3e-4"))
    assert load_config(path).train.lr == 3e-4


@pytest.mark.parametrize("override, expected", [
    ("train.lr", "expected key=value"),
    ("=3", "dotted key"),
    ("train..lr=3", "dotted key"),
    ("train.lr=abc", "'train.lr'"),
    ("train.nope=1", "'train.nope'"),
    ("model.sub=1", "is a value"),
])
def test_bad_override(tmp_path, override, expected):
    assert expected in error_for(tmp_path, BASE, [override])


def test_parse_override_scalar_types():
    assert parse_override("a.b=3") == (["a", "b"], 3)
    assert parse_override("a=no") == (["a"], False)
    assert parse_override("a=null") == (["a"], None)


def test_invalid_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")


def test_every_field_documented_and_example_covers_all():
    rows = describe_keys()
    assert all(description for _, _, description in rows)
    example = Path(__file__).parents[2] / "examples" / "train_full.yaml"
    raw = yaml.safe_load(example.read_text())
    flat = set()

    def walk(node, prefix):
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            else:
                flat.add(f"{prefix}{key}")

    walk(raw, "")
    documented = {key for key, _, _ in rows}
    assert documented - flat <= {"train.epochs"}  # max_steps and epochs are exclusive
    TrainConfig.model_validate(raw)
