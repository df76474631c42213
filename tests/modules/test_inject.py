"""Target matching and in-place LoRA injection."""

import pytest
import torch
from torch import nn

from nibbletune.errors import NibbletuneError
from nibbletune.modules import (
    LinearNF4,
    LoraLinear,
    LoraSettings,
    apply_lora,
    linear_layers,
    lora_settings_of,
    resolve_targets,
)


def find_linear_names(model):
    return list(linear_layers(model))


class _Attn(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(16, 16)
        self.v_proj = LinearNF4.from_linear(nn.Linear(64, 64))
        self.norm = nn.LayerNorm(16)


class _Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 16)
        self.layers = nn.ModuleList([_Attn(), _Attn()])
        self.lm_head = nn.Linear(16, 10, bias=False)


def test_linear_layers_exclude_lm_head_and_non_linears():
    assert find_linear_names(_Model()) == [
        "layers.0.q_proj", "layers.0.v_proj", "layers.1.q_proj", "layers.1.v_proj",
    ]


def test_resolve_targets_names_paths_and_regex():
    model = _Model()
    assert resolve_targets(model, ["q_proj"]) == ["layers.0.q_proj", "layers.1.q_proj"]
    assert resolve_targets(model, ["layers.1.v_proj"]) == ["layers.1.v_proj"]
    assert resolve_targets(model, r"layers\.0\..*") == ["layers.0.q_proj", "layers.0.v_proj"]
    assert resolve_targets(model, "all-linear") == find_linear_names(model)


def test_unknown_target_lists_the_linear_names():
    with pytest.raises(NibbletuneError, match=r"\['k_proj'\].*'q_proj', 'v_proj'"):
        resolve_targets(_Model(), ["q_proj", "k_proj"])
    with pytest.raises(NibbletuneError, match="matches no linear"):
        resolve_targets(_Model(), r"proj")  # a regex must match the full path
    with pytest.raises(NibbletuneError, match="invalid"):
        resolve_targets(_Model(), r"(")


def test_apply_lora_wraps_and_freezes():
    model = _Model()
    wrapped = apply_lora(model, LoraSettings(r=4, alpha=8, target_modules=["v_proj"], use_dora=True))
    assert wrapped == ["layers.0.v_proj", "layers.1.v_proj"]
    assert isinstance(model.layers[0].v_proj, LoraLinear) and isinstance(model.layers[0].v_proj.base, LinearNF4)
    trainable = sorted(name for name, p in model.named_parameters() if p.requires_grad)
    assert trainable == [
        f"layers.{i}.v_proj.{n}" for i in (0, 1) for n in ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector")
    ]
    assert model.layers[0].v_proj.scaling == 2.0
    # a wrapped layer is listed once, at its own path, never its children
    assert "layers.0.v_proj" in find_linear_names(model) and "layers.0.v_proj.base" not in find_linear_names(model)
    assert lora_settings_of(model).target_modules == ["v_proj"]  # kept for save_adapter
    with pytest.raises(NibbletuneError, match="already has LoRA"):
        apply_lora(model, LoraSettings(r=4))


def test_gpt2_conv1d_is_wrapped_with_the_same_function():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50, n_positions=16)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    ids = torch.randint(0, 50, (1, 8))
    before = model(ids).logits
    names = find_linear_names(model)
    assert names == ["transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj",
                     "transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj"]
    apply_lora(model, LoraSettings(r=4, alpha=8, dropout=0.0))
    layer = model.transformer.h[0].attn.c_attn
    assert isinstance(layer.base, nn.Linear) and (layer.in_features, layer.out_features) == (32, 96)
    torch.testing.assert_close(model(ids).logits, before, rtol=1e-5, atol=1e-5)


def test_adapter_dtype_setting():
    model = _Model()
    apply_lora(model, LoraSettings(r=2, target_modules=["q_proj"], adapter_dtype="bfloat16"))
    assert model.layers[0].q_proj.lora_A.weight.dtype == torch.bfloat16
    with pytest.raises(NibbletuneError, match="adapter_dtype"):
        apply_lora(_Model(), LoraSettings(adapter_dtype="int8"))


def test_apply_lora_takes_a_peft_config_and_refuses_what_it_cannot_honour():
    peft = pytest.importorskip("peft")
    model = _Model()
    apply_lora(model, peft.LoraConfig(r=4, lora_alpha=16, lora_dropout=0.1, target_modules=["q_proj"], use_rslora=True))
    layer = model.layers[0].q_proj
    assert isinstance(layer, LoraLinear) and layer.r == 4 and layer.scaling == 16 / 2 and layer.use_rslora
    assert lora_settings_of(model).dropout == 0.1
    with pytest.raises(NibbletuneError, match="rank_pattern"):
        apply_lora(_Model(), peft.LoraConfig(r=4, target_modules=["q_proj"], rank_pattern={"q_proj": 8}))
    with pytest.raises(NibbletuneError, match="modules_to_save"):
        apply_lora(_Model(), peft.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]))
