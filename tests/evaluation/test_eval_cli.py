"""`nibbletune eval` as a user runs it: the two forms agree, --json parses, errors are one line with exit 2."""

from __future__ import annotations

import json

import pytest
import yaml
from eval_helpers import BATCH, SEQ_LEN, toy_rows
from train_helpers import build_tiny_base, write_jsonl

from nibbletune.cli.main import main

FAST = ["--max-new-tokens", "4", "--limit", "3"]


def run_json(argv, capsys) -> dict:
    assert main(["eval", *argv, *FAST, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_config_form_and_flag_form_agree(trained, capsys):
    from_config = run_json([str(trained.config)], capsys)
    from_flags = run_json(["--model", str(trained.base), "--adapter", str(trained.output_dir),
                           "--data", str(trained.eval_path), "--seq-len", str(SEQ_LEN), "--batch-size", str(BATCH)],
                          capsys)
    assert from_config == from_flags
    assert from_config["generation_examples"] == 3 and from_config["max_new_tokens"] == 4
    assert from_config["adapter"]["loss"] < from_config["base"]["loss"]


def test_table_is_printed_by_default(trained, capsys):
    assert main(["eval", str(trained.config), *FAST, "--set", "data.format=completion"]) == 0
    captured = capsys.readouterr()
    assert "metric" in captured.out and "base+adapter" in captured.out and "exact match" in captured.out
    assert "scoring base+adapter" in captured.err


def _error(argv, capsys) -> str:
    """The error line of a failing command (notes may come before it, nothing after)."""
    capsys.readouterr()
    assert main(["eval", *argv]) == 2
    *notes, error = capsys.readouterr().err.splitlines()
    assert error.startswith("nibbletune eval: error: ") and all(": note: " in line for line in notes), notes
    return error


def test_user_errors_are_one_line(trained, tmp_path, capsys):
    base, data = str(trained.base), str(trained.eval_path)
    assert "no such file or directory" in _error(["--model", base, "--data", str(tmp_path / "none.jsonl")], capsys)
    (tmp_path / "empty.jsonl").write_text("")
    assert "file holds no rows" in _error(["--model", base, "--data", str(tmp_path / "empty.jsonl")], capsys)
    assert "no example with a supervised token among 12 rows" in _error(
        ["--model", base, "--data", data, "--seq-len", "4"], capsys)  # every completion truncated away
    assert "adapter_config.json" in _error(["--model", base, "--adapter", str(tmp_path), "--data", data], capsys)
    assert "give a training CONFIG, or --model and --data" in _error([], capsys)
    assert "--data does not combine with CONFIG" in _error([str(trained.config), "--data", data], capsys)
    assert "--set changes a CONFIG" in _error(["--model", base, "--data", data, "--set", "train.seq_len=8"], capsys)
    raw = yaml.safe_load(trained.config.read_text())
    del raw["data"]["eval_path"]
    (tmp_path / "no_eval.yaml").write_text(yaml.safe_dump(raw))
    assert "'data.eval_path' is not set" in _error([str(tmp_path / "no_eval.yaml")], capsys)
    full = {key: value for key, value in raw.items() if key != "lora"}
    full.update(method="full", data={**raw["data"], "eval_path": data}, quant={"compute_dtype": "float32"})
    (tmp_path / "full.yaml").write_text(yaml.safe_dump(full))
    assert "method full writes a whole model" in _error([str(tmp_path / "full.yaml")], capsys)


def test_adapter_for_another_base_fails_before_scoring(trained, tmp_path, capsys):
    other = build_tiny_base(tmp_path / "other", hidden=32)
    err = _error(["--model", str(other), "--adapter", str(trained.output_dir), "--data", str(trained.eval_path)],
                 capsys)
    assert "adapter trained for another base model?" in err and f"{other} has 32x" in err


def test_bad_limit_is_an_argument_error(capsys):
    with pytest.raises(SystemExit) as info:
        main(["eval", "--model", "m", "--data", "d", "--limit", "-1"])
    assert info.value.code == 2
    assert "expected 0 or more examples" in capsys.readouterr().err


def test_limit_all_and_zero(trained, tmp_path, capsys):
    path = write_jsonl(tmp_path / "d.jsonl", toy_rows(3, seed=5))
    common = ["eval", "--model", str(trained.base), "--data", str(path), "--max-new-tokens", "2", "--json"]
    assert main([*common, "--limit", "all"]) == 0
    assert json.loads(capsys.readouterr().out)["generation_examples"] == 3
    assert main([*common, "--limit", "0"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["generation_examples"] == 0 and shown["base"]["exact_match"] is None
