"""`data.on_bad_rows` through `nibbletune train`: a broken row stops the run with its line, or is skipped and counted."""

from __future__ import annotations

import pytest

from nibbletune.errors import NibbletuneError
from nibbletune.training import load_config, train


def test_broken_row_stops_or_is_skipped(make_config, tiny_data, capsys):
    path, output_dir = make_config("bad", max_steps=2, eval_every=0)
    broken = tiny_data / "broken.jsonl"
    lines = (tiny_data / "train.jsonl").read_text().splitlines()
    broken.write_text("\n".join(lines[:10] + ['{"prompt": "reverse: a b", "completion'] + lines[10:]) + "\n")
    overrides = [f"data.path={broken}", "data.eval_path=null"]
    with pytest.raises(NibbletuneError, match=r"broken.jsonl:11"):
        train(load_config(path, overrides), progress=False)
    result = train(load_config(path, overrides + ["data.on_bad_rows=skip"]), progress=False)
    assert result.steps == 2
    warnings = capsys.readouterr().err
    assert "left out 1 bad row" in warnings and "broken.jsonl:11: invalid JSON" in warnings, warnings
