"""The one rule for linear layers and 4-bit layers, against transformers' own rule for bitsandbytes."""

import pytest
import torch
import transformers
from transformers.quantizers.base import get_keys_to_not_convert
from transformers.quantizers.quantizers_utils import should_convert_module

from nibbletune.modules import four_bit_layer_names, linear_layers
from nibbletune.modules.linear_layers import default_excluded_patterns, matches

NAMES = ["model.layers.0.mlp.down_proj", "model.layers.1.self_attn.q_proj", "model.layers.10.mlp.up_proj",
         "transformer.h.0.mlp.c_fc", "transformer.h.1.attn.c_proj", "lm_head", "pooler.dense", "model.layers.01"]
PATTERNS = ["down_proj", "proj", "model.layers.1", "layers.1", "h.0", "transformer.h.1", "model.layers.*.mlp",
            "lm_head", "fc", "c_fc.weight", "mlp.up", r"model\.layers\.0\..*"]


@pytest.mark.parametrize("pattern", PATTERNS)
def test_skip_patterns_match_as_transformers_matches_them(pattern):
    for name in NAMES:
        assert matches(name, [pattern]) == (not should_convert_module(name, [pattern])), (name, pattern)


def _model(family: str):
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=64)
    with torch.device("meta"):
        if family == "gpt2":
            return transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64))
        if family == "bert":
            return transformers.BertModel(transformers.BertConfig(**{k: v for k, v in small.items()
                                                                        if k != "num_key_value_heads"}))
        if family == "t5":
            return transformers.T5ForConditionalGeneration(transformers.T5Config(
                d_model=32, d_ff=64, num_layers=1, num_heads=2, vocab_size=64, d_kv=16))
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**small, tie_word_embeddings=family == "tied"))


@pytest.mark.parametrize("family", ["llama", "tied", "gpt2", "bert", "t5"])
def test_linear_layers_are_what_transformers_would_convert_to_4bit(family):
    """Candidates are exactly nn.Linear and Conv1D; excluded are transformers' keys not to convert."""
    from transformers.pytorch_utils import Conv1D

    model = _model(family)
    keys = sorted(set(get_keys_to_not_convert(model)) | set(getattr(model, "_keep_in_fp32_modules", None) or ()))
    theirs = [name for name, module in model.named_modules()
              if (type(module) is torch.nn.Linear or isinstance(module, Conv1D)) and should_convert_module(name, keys)]
    assert list(linear_layers(model)) == theirs
    assert "lm_head" in default_excluded_patterns(model)


def test_four_bit_layers_of_gpt2_are_its_conv1d_layers():
    model = _model("gpt2")
    assert four_bit_layer_names(model) == [f"transformer.h.{i}.{name}" for i in (0, 1)
                                           for name in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    assert four_bit_layer_names(model, ["c_fc"]) == [name for name in four_bit_layer_names(model) if "c_fc" not in name]


def test_subclasses_of_linear_are_left_alone():
    class Scaled(torch.nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), Scaled(4, 4))
    assert list(linear_layers(model)) == ["0"]
