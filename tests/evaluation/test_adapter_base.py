"""The base quantization eval, merge and generate read beside an adapter (one lookup: loading.base_record),
wherever it is recorded, and the base model an adapter names."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml

from nibbletune.errors import FormatError
from nibbletune.evaluation.adapter_base import recorded_base_name
from nibbletune.loading.base_record import recorded_base_quantization


def _layouts(trained, root):
    """Adapter directories recording the quantization in each place the lookup reads."""
    quant = {"type": "fp4", "blocksize": 128, "double_quant": False, "compute_dtype": "bfloat16"}
    sidecar = root / "sidecar"
    shutil.copytree(trained.output_dir, sidecar, ignore=shutil.ignore_patterns("checkpoints"))
    null_sidecar = root / "null"
    null_sidecar.mkdir()
    (null_sidecar / "nibbletune.json").write_text(json.dumps({"format": 2, "base_quantization": None}))
    config_only = root / "config"
    config_only.mkdir()
    (config_only / "config.yaml").write_text(yaml.safe_dump({"quant": quant}))
    state_only = root / "state"
    state_only.mkdir()
    (state_only / "trainer_state.json").write_text(json.dumps({"config": {"quant": {**quant, "type": "nf4"}}}))
    nothing = root / "nothing"
    nothing.mkdir()
    return [sidecar, null_sidecar, config_only, state_only, nothing]


def test_every_place_the_record_can_be(trained, tmp_path):
    sidecar, null_sidecar, config_only, state_only, nothing = (recorded_base_quantization(d)
                                                                for d in _layouts(trained, tmp_path))
    assert sidecar.source.endswith("nibbletune.json") and sidecar.settings is not None
    assert null_sidecar.settings is None  # trained on a base without 4-bit linears
    assert (config_only.settings.quant_type, config_only.settings.blocksize) == ("fp4", 128)
    assert state_only.settings.quant_type == "nf4" and state_only.source.endswith("trainer_state.json")
    assert nothing.from_defaults and nothing.settings.quant_type == "nf4"


def test_bad_records_are_format_errors(tmp_path):
    (tmp_path / "nibbletune.json").write_text("{not json")
    with pytest.raises(FormatError, match="nibbletune.json: cannot read"):
        recorded_base_quantization(tmp_path)


def test_recorded_base_name(trained, tmp_path):
    assert recorded_base_name(trained.output_dir) == str(trained.base)
    assert recorded_base_name(tmp_path) is None
