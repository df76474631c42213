"""lora.init: loftq through `nibbletune train`: the base is LoftQ-quantized while it loads."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import pytest
import torch

from nibbletune.loading import load_model
from nibbletune.loading.peft_adapter import load_adapter
from nibbletune.modules.loftq import LOFTQ_NOTE, read_loftq_note
from nibbletune.modules.loftq_base import LoftQBase
from nibbletune.quant import QuantSettings
from nibbletune.training import ConfigError, TrainHooks, load_config, train
from nibbletune.training.checkpoint import list_checkpoints
from nibbletune.training.config import check_against_model
from nibbletune.training.metrics import read_metrics

IDS = torch.tensor([[5, 17, 42, 99, 7, 3, 250, 11, 64, 2, 90, 18]])
LORA = ["lora.r=16", "lora.alpha=16", "train.max_steps=2", "train.save_every=1", "train.eval_every=0"]


def logits(model) -> torch.Tensor:
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = model(input_ids=IDS).logits.float()
    model.train(was_training)
    return out


def train_capturing(config_path, init, *overrides):
    """Train with lora.init=`init`; returns (config, logits right after adapter init, trained model)."""
    config = load_config(config_path, [*LORA, f"lora.init={init}", *overrides])
    seen = {}

    def on_model(model):
        seen["model"], seen["initial"] = model, logits(model)

    train(config, progress=False, hooks=TrainHooks(on_model=on_model))
    return config, seen["initial"], seen["model"]


def test_loftq_init_is_closer_to_full_precision_and_marks_its_adapter(make_config, tiny_base):
    from transformers import AutoModelForCausalLM

    full = logits(AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32))
    _, plain_initial, _ = train_capturing(make_config("plain")[0], "default")
    path, output_dir = make_config("loftq")
    config, loftq_initial, trained = train_capturing(path, "loftq", "lora.loftq_iters=2")
    plain_error = torch.linalg.norm(plain_initial - full)
    loftq_error = torch.linalg.norm(loftq_initial - full)
    assert loftq_error < 0.9 * plain_error, (loftq_error, plain_error)

    note = read_loftq_note(output_dir)
    assert note["init"] == "loftq" and note["num_iters"] == 2 and note["quant"]["quant_type"] == "nf4"
    assert not note["base_is_plain_quantization"] and "Q(W - scaling * B0 A0)" in note["note"]
    assert (list_checkpoints(output_dir)[-1] / LOFTQ_NOTE).is_file()
    assert json.loads((list_checkpoints(output_dir)[-1] / LOFTQ_NOTE).read_text()) == note
    assert read_loftq_note(make_config("plain")[1]) is None

    # The note's recipe rebuilds the base training used: same logits as the trained model.
    quant = QuantSettings.from_record(note["quant"]).with_changes(compute_dtype="float32")
    loftq = LoftQBase(config.lora.settings(), quant)
    assert config.lora.settings().loftq_iters == note["num_iters"]
    rebuilt = load_model(tiny_base, quant, quantize_weight=loftq)
    load_adapter(rebuilt, output_dir)
    torch.testing.assert_close(logits(rebuilt), logits(trained), atol=1e-5, rtol=1e-5)
    plain_base = load_model(tiny_base, QuantSettings(quant_type="nf4", double_quant=True, blocksize=64, compute_dtype="float32"))
    load_adapter(plain_base, output_dir)
    mismatch = torch.linalg.norm(logits(plain_base) - logits(trained))
    assert mismatch > 0.1 * loftq_error  # on plain Q(W) a 2-round LoftQ adapter is off: why the note


def test_one_round_loftq_adapter_runs_on_the_plain_base_and_resumes(make_config, tiny_base):
    path, output_dir = make_config("loftq_resume")
    config, _, trained = train_capturing(path, "loftq", "train.max_steps=3")
    assert read_loftq_note(output_dir)["base_is_plain_quantization"]
    plain_base = load_model(tiny_base, QuantSettings(quant_type="nf4", double_quant=True, blocksize=64, compute_dtype="float32"))
    load_adapter(plain_base, output_dir)
    torch.testing.assert_close(logits(plain_base), logits(trained), atol=1e-5, rtol=1e-5)
    whole = [r["loss"] for r in read_metrics(output_dir)]
    # Resume from step 2 into a copy: LoftQ is recomputed while loading, then the checkpoint's factors load.
    copy = output_dir.parent / "loftq_copy"
    shutil.copytree(output_dir, copy)
    shutil.rmtree(copy / "checkpoints" / "step-00000003", ignore_errors=True)
    resumed = train(config.model_copy(update={"output_dir": str(copy)}), resume="auto", progress=False)
    assert resumed.losses == whole[2:]


def test_loftq_refuses_a_prequantized_checkpoint(make_config):
    config = load_config(make_config("prequantized")[0], ["lora.init=loftq"])
    model_config = SimpleNamespace(quantization_config={"quant_method": "bitsandbytes", "load_in_4bit": True},
                                   max_position_embeddings=128)
    with pytest.raises(ConfigError, match="loftq needs the full-precision weights.*pre-quantized"):
        check_against_model(config, model_config)
