"""method: lora (16-bit frozen base + adapters) and full (every weight) through the same loop; train.max_seconds."""

from __future__ import annotations

import json

import pytest
import torch

from nibbletune.training import ConfigError, TrainHooks, TrainingInterrupted, load_config, train
from nibbletune.training.checkpoint import list_checkpoints
from nibbletune.training.metrics import read_metrics


def _config(path, *overrides):
    raw = load_config(path).model_dump(mode="json")
    del raw["lora"]
    raw["quant"] = {"compute_dtype": "float32"}
    from nibbletune.training.config import apply_overrides, config_from_dict

    return config_from_dict(apply_overrides(raw, list(overrides)))


def test_method_lora_trains_on_a_16bit_base_and_merges_onto_it(make_config, tiny_base, tmp_path):
    path, output_dir = make_config("lora16", max_steps=3, eval_every=0, lr=2e-2)
    config = _config(path, "method=lora", "lora.r=4", "lora.alpha=8")
    seen = []
    result = train(config, progress=False, hooks=TrainHooks(on_model=seen.append))
    assert result.losses[-1] < result.losses[0]
    model = seen[0]
    assert not any(type(m).__name__ == "LinearNF4" for m in model.modules())
    assert json.loads((output_dir / "nibbletune.json").read_text())["base_quantization"] is None
    from nibbletune.export import merge

    report = merge(tiny_base, output_dir, tmp_path / "merged", dtype="float32")
    assert report.base_record.settings is None and report.verification.relative_max_diff < 1e-4


def test_method_full_writes_a_model_and_resumes_exactly(make_config, tmp_path):
    path, output_dir = make_config("full", max_steps=6, eval_every=0, save_every=2, lr=1e-3)
    config = _config(path, "method=full")
    reference = train(config, progress=False)
    assert reference.losses[-1] < reference.losses[0]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    trained = AutoModelForCausalLM.from_pretrained(output_dir)  # a plain transformers directory
    AutoTokenizer.from_pretrained(output_dir)
    assert trained.model.layers[0].mlp.up_proj.weight.dtype == torch.float32
    assert (list_checkpoints(output_dir)[-1] / "model.safetensors").is_file()

    pieces_dir = tmp_path / "pieces"
    pieces = config.model_copy(update={"output_dir": str(pieces_dir)})

    def stop_at_3(trainer, record):
        if record["step"] == 3:
            trainer.request_stop()

    with pytest.raises(TrainingInterrupted):
        train(pieces, progress=False, hooks=TrainHooks(on_step=stop_at_3))
    train(pieces, resume="auto", progress=False)
    assert [r["loss"] for r in read_metrics(pieces_dir)] == [r["loss"] for r in read_metrics(output_dir)]
    resumed = AutoModelForCausalLM.from_pretrained(pieces_dir)
    for (name, a), (_, b) in zip(trained.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name


def test_method_sections_are_checked(make_config):
    path, _ = make_config("checked")  # its YAML sets quant.type and a lora section
    with pytest.raises(ConfigError, match="'quant.type' applies to method qlora only"):
        load_config(path, ["method=lora"])
    raw = load_config(path).model_dump(mode="json")
    raw["method"], raw["quant"] = "full", {"compute_dtype": "float32"}
    from nibbletune.training.config import config_from_dict

    with pytest.raises(ConfigError, match="'lora' section applies to methods qlora and lora"):
        config_from_dict(raw)
    with pytest.raises(ConfigError, match="method"):
        load_config(path, ["method=adapter"])


def test_max_seconds_stops_early_and_saves(make_config):
    path, output_dir = make_config("capped", max_steps=10_000, eval_every=0, max_seconds=0.5)
    result = train(load_config(path), progress=False)
    assert result.time_capped and 0 < result.steps < 10_000
    assert (output_dir / "adapter_model.safetensors").is_file()
    assert read_metrics(output_dir)[-1]["step"] == result.steps
