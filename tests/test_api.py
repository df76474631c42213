"""The public API at the package top level, as a user of transformers + PEFT would call it."""

from __future__ import annotations

import pytest
import torch
import transformers

import nibbletune
from nibbletune.errors import NibbletuneError


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
    path = tmp_path_factory.mktemp("llama")
    transformers.LlamaForCausalLM(config).save_pretrained(path, safe_serialization=True)
    return path


IDS = torch.tensor([[3, 14, 15, 92, 65, 35]])


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def test_import_is_light():
    import subprocess
    import sys

    code = "import sys, nibbletune; print('torch' in sys.modules, 'transformers' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split() \
        == ["False", "False"]


def test_bitsandbytes_config_and_our_settings_build_the_same_model(model_dir):
    bnb_config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                 bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
    from_bnb = nibbletune.load_model(model_dir, quantization_config=bnb_config)
    ours = nibbletune.load_model(model_dir, nibbletune.QuantSettings(compute_dtype="float32"))
    assert from_bnb.nibbletune_quant_settings == ours.nibbletune_quant_settings
    torch.testing.assert_close(_logits(from_bnb), _logits(ours), atol=0, rtol=0)
    with pytest.raises(NibbletuneError, match="not both"):
        nibbletune.load_model(model_dir, nibbletune.QuantSettings(), quantization_config=bnb_config)


def test_peft_config_in_save_adapter_needs_nothing_passed_back(model_dir, tmp_path):
    peft = pytest.importorskip("peft")
    quant = nibbletune.QuantSettings(quant_type="fp4", compute_dtype="float32")
    model = nibbletune.load_model(model_dir, quant)
    nibbletune.apply_lora(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)
    nibbletune.save_adapter(model, tmp_path / "adapter")
    again = nibbletune.load_model(model_dir, quant)
    settings = nibbletune.load_adapter(again, tmp_path / "adapter")
    assert (settings.r, settings.alpha, settings.target_modules) == (4, 8, ["q_proj", "v_proj"])
    torch.testing.assert_close(_logits(again), _logits(model.eval()), atol=0, rtol=0)
    merged = nibbletune.merge(model_dir, tmp_path / "adapter", tmp_path / "merged", dtype="float32")
    assert merged.base_record.settings.quant_type == "fp4" and merged.verification.passed


def test_train_takes_a_dict_with_overrides(model_dir, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({f"w{i}": i for i in range(120)} | {"<unk>": 120, "</s>": 121},
                                           unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="</s>", pad_token="</s>") \
        .save_pretrained(model_dir)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(f'{{"text": "w{i} w{i + 1} w{i + 2} w{i + 3}"}}\n' for i in range(20)))
    raw = {"model": str(model_dir), "data": {"path": str(data)}, "output_dir": str(tmp_path / "run"),
           "quant": {"compute_dtype": "float32"}, "train": {"max_steps": 2, "micro_batch_size": 2, "seq_len": 16}}
    result = nibbletune.train(raw, progress=False, overrides=["train.max_steps=3"])
    assert result.steps == 3 and raw["train"]["max_steps"] == 2  # the caller's dict is not changed
    assert isinstance(nibbletune.TrainConfig.model_validate(raw), nibbletune.TrainConfig)
