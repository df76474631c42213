"""GGUF export checked by computation: a forward that reads only the GGUF file (llama.cpp's names,
metadata and rope layout, tests/export/gguf_reference.py) against the transformers model it came from."""

import dataclasses
import json

import numpy as np
import pytest
import torch
import transformers

gguf = pytest.importorskip("gguf")

from export_helpers import save_family
from gguf_reference import forward, read_gguf_lora, read_gguf_model

from nibbletune.export import gguf_export
from nibbletune.export.gguf_export import export_gguf

# max |logits - HF float32 logits| / std accepted per type: each type's rounding noise on these widened
# (so noisy) models. Measured worst case over the families: f32 2e-6, f16 2.5e-3, bf16 1.8e-2,
# q8_0 6.2e-2, q4_0 1.1; limits are ~3x that.
LIMITS = {"f32": 1e-5, "f16": 8e-3, "bf16": 6e-2, "q8_0": 0.2, "q4_0": 3.5}
# Against HF run on the same rounded weights only float32 summation order differs: measured <= 2e-6
# for every family and type. This is the check that catches export bugs in quantized files.
EXACT = 2e-5
GGML_TYPES = {"f32": "F32", "f16": "F16", "bf16": "BF16", "q8_0": "Q8_0", "q4_0": "Q4_0"}
FAMILIES = ["llama", "llama-tied", "llama-head-dim", "mistral", "qwen2-tied", "qwen2"]


def rounded_state(model, out_type: str) -> dict:
    """The model's state with every 2-D weight rounded through `out_type` as the exporter stores it
    (rows that do not fill 32-wide blocks in F16). Row permutation commutes with row-wise blocks."""
    qtype = getattr(gguf.GGMLQuantizationType, GGML_TYPES[out_type])
    state, seen = {}, set()
    for name, value in model.state_dict().items():
        if value.data_ptr() in seen:  # tied lm_head: functional_call ties it back
            continue
        seen.add(value.data_ptr())
        if value.ndim == 2 and out_type != "f32":
            t = qtype if value.shape[-1] % 32 == 0 or out_type in ("f16", "bf16") else gguf.GGMLQuantizationType.F16
            data = value.float().numpy()
            encoded = data.astype(np.float16) if t == gguf.GGMLQuantizationType.F16 else gguf.quants.quantize(data, t)
            value = torch.from_numpy(gguf.quants.dequantize(encoded, t).astype(np.float32).reshape(value.shape))
        state[name] = value
    return state


@pytest.fixture(scope="module")
def family_models(tmp_path_factory, tokenizer, token_ids):
    """{family: (model dir, HF model, HF float32 logits for token_ids)}."""
    root = tmp_path_factory.mktemp("families")
    return {family: save_family(family, root, tokenizer, token_ids)
            for family in [*FAMILIES, "llama3-rope", "linear-rope"]}


def hf_logits(model, state: dict, token_ids) -> torch.Tensor:
    with torch.no_grad():
        return torch.func.functional_call(model, state, (torch.tensor([token_ids]),)).logits[0]


def logit_agreement(got: torch.Tensor, expected: torch.Tensor) -> tuple[float, float]:
    """(max |got - expected| / std(expected), fraction of positions with the same argmax)."""
    rel = float((got - expected).abs().max() / expected.std())
    top1 = float((got.argmax(-1) == expected.argmax(-1)).float().mean())
    return rel, top1


def check_family(family_models, token_ids, tmp_path, family, out_type, min_top1):
    path, hf_model, expected = family_models[family]
    export_gguf(path, tmp_path / "m.gguf", out_type)
    model = read_gguf_model(tmp_path / "m.gguf")
    assert model.arch == ("qwen2" if family.startswith("qwen2") else "llama")
    assert ("output.weight" in model.tensors) == ("tied" not in family)
    logits = forward(model, token_ids)
    exact, _ = logit_agreement(logits, hf_logits(hf_model, rounded_state(hf_model, out_type), token_ids))
    assert exact <= EXACT, f"{family} {out_type}: {exact:.3g} x std from HF on the same rounded weights"
    rel, top1 = logit_agreement(logits, expected)
    assert rel <= LIMITS[out_type], f"{family} {out_type}: max diff {rel:.3g} x std"
    assert top1 >= min_top1


@pytest.mark.parametrize("out_type", ["f32", "f16", "q8_0"])
@pytest.mark.parametrize("family", FAMILIES)
def test_gguf_forward_matches_transformers(family_models, token_ids, tmp_path, family, out_type):
    check_family(family_models, token_ids, tmp_path, family, out_type, 1.0 if out_type == "f32" else 0.9)


@pytest.mark.parametrize("out_type", ["bf16", "q4_0"])
@pytest.mark.parametrize("family", ["llama", "qwen2-tied"])
def test_gguf_forward_low_precision(family_models, token_ids, tmp_path, family, out_type):
    check_family(family_models, token_ids, tmp_path, family, out_type, 0.5)


@pytest.mark.parametrize("family", ["llama3-rope", "linear-rope"])
def test_gguf_forward_rope_scaling(family_models, token_ids, tmp_path, family):
    check_family(family_models, token_ids, tmp_path, family, "f32", 1.0)
    fields = read_gguf_model(tmp_path / "m.gguf")
    if family == "llama3-rope":
        assert fields.tensors["rope_freqs.weight"].shape == (8,)
    else:
        assert fields.rope_scale == 0.25


def test_reference_catches_missing_qk_permutation(family_models, token_ids, tmp_path, monkeypatch):
    # The check is only worth something if it fails on HF-layout q/k rows in a "llama" file.
    llama = gguf_export.ARCHITECTURES["LlamaForCausalLM"]
    monkeypatch.setitem(gguf_export.ARCHITECTURES, "LlamaForCausalLM", dataclasses.replace(llama, permute_qk=False))
    path, _, expected = family_models["llama"]
    export_gguf(path, tmp_path / "m.gguf", "f32")
    rel, _ = logit_agreement(forward(read_gguf_model(tmp_path / "m.gguf"), token_ids), expected)
    assert rel > 100 * LIMITS["f32"]


def test_hyperparameters_metadata(family_models, tmp_path):
    path, _, _ = family_models["llama-head-dim"]
    export_gguf(path, tmp_path / "m.gguf", "f16")
    model = read_gguf_model(tmp_path / "m.gguf")
    config = json.loads((path / "config.json").read_text())
    assert (model.n_layer, model.n_embd, model.n_ff) == (2, 64, 128)
    assert (model.n_head, model.n_head_kv, model.head_dim, model.n_rot) == (4, 2, 32, 32)
    assert model.rope_base == 500000.0 and model.n_ctx_train == 128
    assert model.rms_eps == pytest.approx(config["rms_norm_eps"])
    assert model.fields["general.file_type"].contents() == int(gguf.LlamaFileType.MOSTLY_F16)


def test_tokenizer_metadata_matches_hf(family_models, tokenizer, tmp_path):
    path, _, _ = family_models["qwen2"]
    export_gguf(path, tmp_path / "m.gguf", "f16")
    fields = read_gguf_model(tmp_path / "m.gguf").fields
    assert fields["tokenizer.ggml.model"].contents() == "gpt2"
    # a GPT-2 byte-level pre-tokenizer (tokenizers' ByteLevel with its default regex)
    assert fields["tokenizer.ggml.pre"].contents() == "gpt-2"
    tokens = fields["tokenizer.ggml.tokens"].contents()
    assert tokens == tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    types = fields["tokenizer.ggml.token_type"].contents()
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    assert [i for i, kind in enumerate(types) if kind == gguf.TokenType.CONTROL] == sorted(special)
    assert all(kind == gguf.TokenType.NORMAL for i, kind in enumerate(types) if i not in special)
    hf_merges = json.loads((path / "tokenizer.json").read_text())["model"]["merges"]
    hf_merges = [m if isinstance(m, str) else " ".join(m) for m in hf_merges]
    assert fields["tokenizer.ggml.merges"].contents() == hf_merges
    assert fields["tokenizer.ggml.bos_token_id"].contents() == tokenizer.bos_token_id == 0
    assert fields["tokenizer.ggml.eos_token_id"].contents() == tokenizer.eos_token_id == 1
    assert "{% for m in messages %}" in fields["tokenizer.chat_template"].contents()


def test_gguf_lora_forward_matches_merged(base_dir, adapter_dir, tmp_path, token_ids):
    """base GGUF + GGUF LoRA (as llama.cpp applies it) == the transformers model with the merged adapter."""
    from nibbletune.export import merge
    from nibbletune.export.gguf_lora import export_gguf_lora

    # llama.cpp adds the adapter to the full-precision base GGUF, so merge onto the 16/32-bit weights
    merge(base_dir, adapter_dir, tmp_path / "merged", dtype="float32", base_16bit=base_dir, verify=False)
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        expected = merged(torch.tensor([token_ids])).logits[0]
    export_gguf(base_dir, tmp_path / "base.gguf", "f32")
    export_gguf_lora(adapter_dir, tmp_path / "lora.gguf", base_dir, "f32")
    loras, fields = read_gguf_lora(tmp_path / "lora.gguf")
    assert fields["general.type"].contents() == "adapter" and fields["adapter.type"].contents() == "lora"
    assert fields["general.architecture"].contents() == "llama"
    assert len(loras) == 14  # 7 linears x 2 layers
    base = read_gguf_model(tmp_path / "base.gguf")
    rel, top1 = logit_agreement(forward(base, token_ids, loras), expected)
    assert rel <= 1e-4 and top1 == 1.0
    without, _ = logit_agreement(forward(base, token_ids), expected)
    assert without > 100 * rel  # the adapter matters
    assert np.isfinite(rel)
