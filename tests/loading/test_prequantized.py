"""A bitsandbytes 4-bit checkpoint saved by transformers loads without bitsandbytes, with the same logits."""

import json

import pytest
import torch
import transformers
from loading_helpers import FAMILIES, count_nf4

from nibbletune.loading import load_model
from nibbletune.quant import from_bnb_state_dict

bnb = pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def bnb_checkpoint(tmp_path_factory):
    """(bitsandbytes-loaded model, directory of its 4-bit save); the bytes are saved before any forward."""
    torch.manual_seed(0)
    config = FAMILIES["llama"][0]()
    plain_dir = tmp_path_factory.mktemp("plain")
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(plain_dir)
    quant_config = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    bnb_model = transformers.AutoModelForCausalLM.from_pretrained(
        plain_dir, quantization_config=quant_config, device_map="cpu", dtype=torch.float32
    ).eval()
    quant_dir = tmp_path_factory.mktemp("bnb4")
    bnb_model.save_pretrained(quant_dir, safe_serialization=True)
    return bnb_model, quant_dir


def test_checkpoint_is_in_the_bnb_format(bnb_checkpoint):
    _, quant_dir = bnb_checkpoint
    qconfig = json.loads((quant_dir / "config.json").read_text())["quantization_config"]
    assert qconfig["quant_method"] == "bitsandbytes" and qconfig["load_in_4bit"]
    from safetensors.torch import load_file

    state = load_file(quant_dir / "model.safetensors")
    assert "model.layers.0.self_attn.q_proj.weight.quant_state.bitsandbytes__nf4" in state
    assert state["model.layers.0.self_attn.q_proj.weight"].dtype == torch.uint8


def test_same_logits_as_bitsandbytes(bnb_checkpoint):
    bnb_model, quant_dir = bnb_checkpoint
    loaded = load_model(quant_dir, compute_dtype="float32")
    assert count_nf4(loaded) == 14
    assert not hasattr(loaded.config, "quantization_config")
    input_ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = loaded(input_ids).logits
        theirs = bnb_model(input_ids).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)


def test_codes_are_the_stored_bytes(bnb_checkpoint):
    """Pre-quantized weights are decoded as stored, never re-quantized."""
    from safetensors.torch import load_file

    _, quant_dir = bnb_checkpoint
    loaded = load_model(quant_dir, compute_dtype="float32", blocksize=128, double_quant=False)
    state = load_file(quant_dir / "model.safetensors")
    prefix = "model.layers.1.mlp.down_proj.weight"
    stored = from_bnb_state_dict(state, prefix)
    ours = loaded.model.layers[1].mlp.down_proj.quantized_weight
    assert torch.equal(ours.packed, stored.packed) and torch.equal(ours.absmax, stored.absmax)
    assert ours.blocksize == 64 and ours.double_quant


def test_loads_with_bitsandbytes_absent(bnb_checkpoint, monkeypatch):
    import sys

    _, quant_dir = bnb_checkpoint
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # any import of it now fails
    loaded = load_model(quant_dir, compute_dtype="float32")
    assert count_nf4(loaded) == 14
