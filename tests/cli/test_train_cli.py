"""`nibbletune train` / `nibbletune data` as a user runs them: help, one-line config errors, a short run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from nibbletune.cli.main import main

sys.path.insert(0, str(Path(__file__).parents[1] / "training"))


def test_train_help_lists_options_and_keys(capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for text in ("--set KEY=VALUE", "--resume", "lora.r", "train.optimizer", "quant.compute_dtype",
                 "train.keep_checkpoints", "train.report_to", "examples/train_full.yaml"):
        assert text in out


def write(tmp_path, raw) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


BASE = {"model": "m", "data": {"path": "d.jsonl"}, "output_dir": "o", "train": {"max_steps": 1}}


@pytest.mark.parametrize("raw, overrides, expected", [
    ({**BASE, "lora": {"r": 0}}, [], "'lora.r' input should be greater than 0"),
    ({**BASE, "trian": {}}, [], "unknown key 'trian'"),
    (BASE, ["train.seq_len=long"], "'train.seq_len' input should be a valid integer"),
    (BASE, ["train.lr"], "expected key=value"),
])
def test_config_errors_are_one_line_exit_2(tmp_path, capsys, raw, overrides, expected):
    argv = ["train", str(write(tmp_path, raw))]
    for item in overrides:
        argv += ["--set", item]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("nibbletune train: error: ") and expected in err


def test_check_prints_validated_config(tmp_path, capsys):
    assert main(["train", str(write(tmp_path, BASE)), "--check", "--set", "train.lr=1e-4"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["train"]["lr"] == 1e-4 and printed["lora"]["r"] == 16


def test_check_refuses_report_to_without_its_package(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    assert main(["train", str(write(tmp_path, BASE)), "--check", "--set", "train.report_to=wandb"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'nibbletune[wandb]'" in err


def test_seq_len_over_model_limit_fails_before_loading(tmp_path, capsys):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "max_position_embeddings": 64,
        "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64,
        "vocab_size": 100}))  # no weights at all: the check must come first
    raw = {**BASE, "model": str(model_dir), "train": {"max_steps": 1, "seq_len": 128}}
    assert main(["train", str(write(tmp_path, raw))]) == 2
    err = capsys.readouterr().err
    assert "'train.seq_len' is 128 but the model allows at most 64" in err


def test_train_and_data_commands_end_to_end(tmp_path):
    from train_helpers import build_tiny_base, make_rows, write_config, write_jsonl

    base = build_tiny_base(tmp_path / "base")
    write_jsonl(tmp_path / "train.jsonl", make_rows(16, seed=1))
    write_jsonl(tmp_path / "eval.jsonl", make_rows(4, seed=2))
    config = write_config(tmp_path / "c.yaml", base, tmp_path, tmp_path / "out", max_steps=2, eval_every=0)
    command = [sys.executable, "-m", "nibbletune.cli.main"]
    env_threads = {"OMP_NUM_THREADS": "1"}
    import os

    env = {**os.environ, **env_threads}
    done = subprocess.run([*command, "train", str(config), "--no-progress"], capture_output=True, text=True,
                          env=env, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    assert "trained 2 steps" in done.stdout
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
    assert len((tmp_path / "out" / "metrics.jsonl").read_text().splitlines()) == 2
    shown = subprocess.run([*command, "data", "--config", str(config), "--samples", "1", "--no-color"],
                           capture_output=True, text=True, env=env, timeout=300, check=False)
    assert shown.returncode == 0, shown.stderr
    assert "reverse:" in shown.stdout
