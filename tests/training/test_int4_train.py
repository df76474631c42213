"""quant.type int4 end to end on the tiny model: train, the adapter's record, merge onto the int4 base."""

from __future__ import annotations

import json

from nibbletune.export import merge
from nibbletune.training import TrainHooks, load_config, train
from nibbletune.training.config import apply_overrides, config_from_dict


def test_int4_qlora_trains_records_int4_and_merges(make_config, tiny_base, tmp_path):
    path, output_dir = make_config("int4", max_steps=4, eval_every=2, lr=2e-2)
    raw = apply_overrides(load_config(path).model_dump(mode="json"), ["quant.type=int4"])
    seen = []
    result = train(config_from_dict(raw), progress=False, hooks=TrainHooks(on_model=seen.append))
    assert result.losses[-1] < result.losses[0]
    four_bit = [m for m in seen[0].modules() if type(m).__name__ == "LinearNF4"]
    assert four_bit and {m.quantized_weight.quant_type for m in four_bit} == {"int4"}
    record = json.loads((output_dir / "nibbletune.json").read_text())["base_quantization"]
    assert record["quant_type"] == "int4" and record["double_quant"] is True
    report = merge(tiny_base, output_dir, tmp_path / "merged", dtype="float32")
    assert report.base_record.settings.quant_type == "int4"
    assert report.verification.relative_max_diff < 1e-4
