"""PEFT adapter files: our save loads in PEFT with equal logits, PEFT's save loads in ours, errors."""

import copy
import json
import warnings

import pytest
import torch
from lora_oracles import randomize_adapter
from safetensors.torch import load_file, save_file

from nibbletune.errors import FormatError, NibbletuneError
from nibbletune.loading.peft_adapter import load_adapter, save_adapter
from nibbletune.modules import LinearNF4, LoraSettings, apply_lora, lora_layers
from nibbletune.quant import quantize

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def _tiny_llama(seed=0):
    config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=97, max_position_embeddings=32,
    )
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).eval()


IDS = torch.tensor([[1, 5, 9, 22, 40, 3, 77, 8]])


def _trained_adapter(model, settings):
    apply_lora(model, settings)
    for seed, layer in enumerate(lora_layers(model).values()):
        randomize_adapter(layer, seed=seed + 10)
    return model


@pytest.mark.parametrize("settings", [
    LoraSettings(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"]),
    LoraSettings(r=4, alpha=8, dropout=0.1, target_modules="all-linear", use_dora=True, use_rslora=True),
    LoraSettings(r=2, alpha=4, dropout=0.0, target_modules=r"model\.layers\.1\.self_attn\.(q|k)_proj"),
], ids=["names", "all-linear-dora-rslora", "regex-one-layer"])
def test_saved_adapter_loads_in_peft_with_matching_logits(tmp_path, settings):
    base = _tiny_llama()
    ours = _trained_adapter(copy.deepcopy(base), settings)
    save_adapter(ours, tmp_path / "adapter", settings, base_model_name_or_path="tiny-llama")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert config["base_model_name_or_path"] == "tiny-llama" and config["lora_alpha"] == settings.alpha
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "adapter").eval()
    ours.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS).logits, theirs(IDS).logits, rtol=1e-4, atol=1e-4)
    peft_wrapped = sorted(n.removeprefix("base_model.model.") for n, m in theirs.named_modules()
                          if isinstance(m, peft.tuners.lora.LoraLayer))
    assert peft_wrapped == sorted(lora_layers(ours))


@pytest.mark.parametrize("use_dora", [False, True])
def test_peft_adapter_loads_in_ours_on_a_4bit_model(tmp_path, use_dora):
    base = _tiny_llama()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
            r=4, lora_alpha=16, target_modules=["k_proj", "up_proj"], use_dora=use_dora, task_type="CAUSAL_LM"))
    for name, param in theirs.named_parameters():
        if "lora_" in name:
            with torch.no_grad():
                param.add_(torch.randn_like(param) * 0.05)
    theirs.save_pretrained(tmp_path / "peft")
    keys = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))

    ours = copy.deepcopy(base)
    settings = load_adapter(ours, tmp_path / "peft")
    assert settings.r == 4 and settings.alpha == 16 and settings.use_dora == use_dora
    save_adapter(ours, tmp_path / "ours", settings)
    again = load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
    assert sorted(again) == sorted(keys)
    for key in keys:
        assert torch.equal(again[key], keys[key]), key
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS).logits, theirs.eval()(IDS).logits, rtol=1e-4, atol=1e-4)

    # the same adapter on a 4-bit base: each LoRA layer equals PEFT's formula on the dequantized weight
    quantized = copy.deepcopy(base)
    for module in list(quantized.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, torch.nn.Linear) and child_name != "lm_head":
                setattr(module, child_name, LinearNF4.from_linear(child))
    load_adapter(quantized, tmp_path / "peft")
    assert isinstance(quantized.model.layers[0].mlp.up_proj.base, LinearNF4)
    dequantized = copy.deepcopy(base)  # PEFT on the same weights, decoded to float32
    for name, module in dequantized.named_modules():
        if isinstance(module, torch.nn.Linear) and name != "lm_head":
            with torch.no_grad():
                module.weight.copy_(quantize(module.weight).dequantize(torch.float32))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = peft.PeftModel.from_pretrained(dequantized, tmp_path / "peft").eval()
    with torch.no_grad():
        torch.testing.assert_close(quantized(IDS).logits, reference(IDS).logits, rtol=1e-4, atol=1e-4)


def test_round_trip_keeps_exact_values(tmp_path):
    settings = LoraSettings(r=4, alpha=8, target_modules=["o_proj"], use_dora=True)
    ours = _trained_adapter(_tiny_llama(), settings)
    save_adapter(ours, tmp_path / "a", settings)
    fresh = _tiny_llama()
    load_adapter(fresh, tmp_path / "a")
    for path, layer in lora_layers(ours).items():
        other = lora_layers(fresh)[path]
        for name, value in layer.adapter_state_dict().items():
            assert torch.equal(value, other.adapter_state_dict()[name]), (path, name)


def test_save_is_atomic_and_keeps_other_files(tmp_path):
    settings = LoraSettings(r=2, target_modules=["q_proj"])
    ours = _trained_adapter(_tiny_llama(), settings)
    out = tmp_path / "adapter"
    out.mkdir()
    (out / "README.md").write_text("keep me")
    save_adapter(ours, out, settings)
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors", "nibbletune.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]  # no temp dir left behind
    with pytest.raises(NibbletuneError, match="no LoRA layers"):
        save_adapter(_tiny_llama(), tmp_path / "empty", settings)


def _saved(tmp_path, settings=None):
    settings = settings or LoraSettings(r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    save_adapter(_trained_adapter(_tiny_llama(), settings), tmp_path / "a", settings)
    return tmp_path / "a"


def test_load_errors_name_the_problem(tmp_path):
    adapter = _saved(tmp_path)
    weights = adapter / "adapter_model.safetensors"
    tensors = load_file(str(weights))

    missing = dict(tensors)
    missing.pop("base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight")
    save_file(missing, str(weights))
    with pytest.raises(FormatError, match="missing key .*v_proj.lora_B"):
        load_adapter(_tiny_llama(), adapter)

    wrong = dict(tensors)
    wrong["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"] = torch.zeros(4, 32)
    save_file(wrong, str(weights))
    model = _tiny_llama()
    with pytest.raises(FormatError, match=r"q_proj.lora_A.weight' has shape \(4, 32\), model expects \(4, 64\)"):
        load_adapter(model, adapter)
    assert not lora_layers(model)  # a failed load leaves the model untouched

    extra = dict(tensors)
    extra["base_model.model.model.layers.0.mlp.gate_proj.lora_A.weight"] = torch.zeros(4, 64)
    extra["base_model.model.model.layers.0.mlp.gate_proj.lora_B.weight"] = torch.zeros(128, 4)
    save_file(extra, str(weights))
    with pytest.raises(FormatError, match="match no LoRA layer"):
        load_adapter(_tiny_llama(), adapter)
    save_file(tensors, str(weights))

    config_path = adapter / "adapter_config.json"
    config = json.loads(config_path.read_text())
    for change, message in [({"peft_type": "IA3"}, "only 'LORA'"), ({"bias": "all"}, "bias"),
                            ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
                            ({"rank_pattern": {"q_proj": 8}}, "rank_pattern"), ({"alpha_pattern": {"q_proj": 2}}, "alpha"),
                            ({"target_modules": ["nope"]}, r"\['nope'\] match no linear")]:
        config_path.write_text(json.dumps({**config, **change}))
        with pytest.raises(NibbletuneError, match=message):
            load_adapter(_tiny_llama(), adapter)
    config_path.write_text("{not json")
    with pytest.raises(FormatError, match="invalid JSON"):
        load_adapter(_tiny_llama(), adapter)
    with pytest.raises(FormatError, match="nowhere: not a directory"):
        load_adapter(_tiny_llama(), tmp_path / "nowhere")
    config_path.write_text(json.dumps(config))
    model = _tiny_llama()
    load_adapter(model, adapter)
    with pytest.raises(NibbletuneError, match="already has LoRA"):
        load_adapter(model, adapter)
