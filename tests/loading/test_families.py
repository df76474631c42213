"""Each supported family loads with 4-bit linears and matches its dequantized fp32 reference."""

import pytest
import torch
import transformers
from loading_helpers import (
    DECODERS,
    FAMILIES,
    build_model,
    count_nf4,
    count_plain_linears,
    dequantized_reference,
    model_output,
)

from nibbletune.loading import load_model
from nibbletune.modules import LinearNF4
from nibbletune.quant import QuantSettings


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_matches_dequantized_reference(family, saved_family):
    model, path = saved_family(family)
    loaded = load_model(path, QuantSettings(compute_dtype="float32"))
    assert count_nf4(loaded) == FAMILIES[family][1]
    # only the output head stays a plain linear (tied or not); encoders have none
    assert count_plain_linears(loaded) == (0 if family == "bert" else 1)
    assert not any(p.requires_grad for p in loaded.parameters())

    input_ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    ours = model_output(loaded, input_ids)
    reference = model_output(dequantized_reference(model), input_ids)
    full = model_output(model, input_ids)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-4)
    # and 4-bit stays near full precision (random tiny models measured 0.963 (gemma2) to 0.99999)
    assert torch.nn.functional.cosine_similarity(ours.flatten(), full.flatten(), dim=0) > 0.95


@pytest.mark.parametrize("family", DECODERS)
def test_decoders_generate(family, saved_family):
    model, path = saved_family(family)
    loaded = load_model(path, QuantSettings(compute_dtype="float32"))
    reference = dequantized_reference(model)
    prompt = torch.tensor([[5, 17, 99, 3]])
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        ours = loaded.generate(prompt, **kwargs)
        theirs = reference.generate(prompt, **kwargs)
    assert ours.shape == (1, 10)
    assert torch.equal(ours, theirs)


def _gemma3_h640():
    """Gemma 3 text with hidden 640 (as the 270M model): sqrt(640) = 25.2982 is not exact in bf16 (25.25)."""
    return transformers.Gemma3TextConfig(hidden_size=640, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1, head_dim=32, vocab_size=256,
                                         max_position_embeddings=128, sliding_window=32)


@pytest.mark.parametrize("stored", ["float32", "bfloat16"])
@pytest.mark.parametrize("family", [*FAMILIES, "gemma3-h640"])
def test_every_buffer_equals_transformers_own_load(family, stored, compute_dtype, tmp_path):
    """Non-persistent buffers (rotary tables, position ids, embedding scales) as transformers builds them.

    Compared with `from_pretrained(dir, dtype=compute_dtype)`, whatever dtype the checkpoint is
    stored in: same names, dtypes and values, bit for bit.
    """
    if family == "gemma3-h640":
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(_gemma3_h640())
    else:
        model = build_model(family)
    model.to(getattr(torch, stored)).save_pretrained(tmp_path, safe_serialization=True)
    dtype = getattr(torch, compute_dtype)
    cls = transformers.AutoModel if family == "bert" else transformers.AutoModelForCausalLM
    theirs = dict(cls.from_pretrained(tmp_path, dtype=dtype).named_buffers())
    loaded = load_model(tmp_path, QuantSettings(compute_dtype=compute_dtype))
    storage = {f"{name}.{attr}" for name, module in loaded.named_modules() if isinstance(module, LinearNF4)
               for attr in ("packed_codes", "absmax", "nested_absmax")}
    ours = {name: buffer for name, buffer in loaded.named_buffers() if name not in storage}
    assert sorted(ours) == sorted(theirs)
    for name, buffer in theirs.items():
        assert ours[name].dtype == buffer.dtype and ours[name].device.type == "cpu", name
        assert torch.equal(ours[name], buffer), f"{name}: {ours[name].flatten()[:3]} vs {buffer.flatten()[:3]}"


@pytest.mark.parametrize("family", ["qwen2", "gpt2"])
def test_tied_embeddings_stay_tied(family, saved_family):
    _, path = saved_family(family)
    loaded = load_model(path, QuantSettings(compute_dtype="float32"))
    assert loaded.get_output_embeddings().weight is loaded.get_input_embeddings().weight


def test_untied_head_loaded_from_its_own_tensor(saved_family):
    model, path = saved_family("llama")
    loaded = load_model(path, QuantSettings(compute_dtype="float32"))
    assert loaded.lm_head.weight is not loaded.model.embed_tokens.weight
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)


def test_compute_dtype_applies_to_unquantized_tensors(saved_family):
    _, path = saved_family("llama")
    loaded = load_model(path, QuantSettings(compute_dtype="bfloat16"))
    assert loaded.model.embed_tokens.weight.dtype == torch.bfloat16
    assert loaded.model.norm.weight.dtype == torch.bfloat16
    assert loaded.lm_head.weight.dtype == torch.bfloat16
    assert loaded(torch.tensor([[1, 2, 3]])).logits.dtype == torch.bfloat16


def test_quant_settings_and_skip_modules(saved_family):
    model, path = saved_family("llama")
    loaded = load_model(path, QuantSettings(compute_dtype="float32", blocksize=32, double_quant=False, skip_modules=("down_proj", "layers.1.self_attn.q_proj")))
    assert count_nf4(loaded) == 14 - 2 - 1
    assert isinstance(loaded.model.layers[0].mlp.down_proj, torch.nn.Linear)
    weight = loaded.model.layers[0].self_attn.q_proj.quantized_weight
    assert weight.blocksize == 32 and not weight.double_quant
    input_ids = torch.tensor([[4, 8, 15, 16, 23, 42]])
    reference = dequantized_reference(model, ["down_proj", "layers.1.self_attn.q_proj"], 32, False)
    torch.testing.assert_close(model_output(loaded, input_ids), model_output(reference, input_ids),
                               atol=1e-5, rtol=1e-4)


def test_fp4(saved_family):
    model, path = saved_family("qwen3")
    loaded = load_model(path, QuantSettings(quant_type="fp4", compute_dtype="float32"))
    input_ids = torch.tensor([[4, 8, 15, 16, 23, 42]])
    reference = dequantized_reference(model, quant_type="fp4")
    torch.testing.assert_close(model_output(loaded, input_ids), model_output(reference, input_ids),
                               atol=1e-5, rtol=1e-4)


def test_base_model_checkpoint_loads_into_causal_lm(tmp_path):
    """Keys saved without the base-model prefix ('layers.0...') load into LlamaForCausalLM ('model.layers.0...')."""
    import transformers

    torch.manual_seed(0)
    config = FAMILIES["llama"][0]()
    config.tie_word_embeddings = True
    base = transformers.LlamaModel(config).eval()
    base.save_pretrained(tmp_path)
    loaded = load_model(tmp_path, QuantSettings(compute_dtype="float32"), model_class="causal-lm")
    assert count_nf4(loaded) == 14
    assert torch.equal(loaded.model.embed_tokens.weight, base.embed_tokens.weight)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight


def test_masked_lm_checkpoint(tmp_path):
    """A BertForMaskedLM checkpoint loads with model_class="masked-lm"; as a bare encoder its pooler is missing."""
    import transformers

    from nibbletune.errors import FormatError

    torch.manual_seed(0)
    config = FAMILIES["bert"][0]()
    config.architectures = ["BertForMaskedLM"]
    full = transformers.BertForMaskedLM(config).eval()
    full.save_pretrained(tmp_path)
    loaded = load_model(tmp_path, QuantSettings(compute_dtype="float32"), model_class="masked-lm")
    assert count_nf4(loaded) == 13  # 12 encoder linears + the prediction head's transform
    reference = dequantized_reference(full)
    input_ids = torch.tensor([[1, 5, 9, 2]])
    torch.testing.assert_close(model_output(loaded, input_ids), model_output(reference, input_ids),
                               atol=1e-5, rtol=1e-4)
    with pytest.raises(FormatError, match="pooler.dense.weight"):
        load_model(tmp_path, QuantSettings(compute_dtype="float32"))
