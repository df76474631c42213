"""A bitsandbytes 4-bit checkpoint saved by transformers loads without bitsandbytes, with the same logits."""

import json

import pytest
import torch
import transformers
from loading_helpers import FAMILIES, count_nf4

from bnb_reference import bnb_model as bnb_reference_model
from nibbletune.loading import load_model
from nibbletune.quant import QuantSettings, from_bnb_state_dict

bnb = pytest.importorskip("bitsandbytes")


def _bnb_checkpoint(root, dtype: torch.dtype):
    """Directory of a tiny Llama saved by transformers+bitsandbytes (NF4, double quant, compute `dtype`).

    The model is stored in `dtype` and saved before any forward (bitsandbytes' AVX512-BF16 kernel
    repacks weights in place on first use).
    """
    torch.manual_seed(0)
    config = FAMILIES["llama"][0]()
    plain_dir = root / "plain"
    transformers.AutoModelForCausalLM.from_config(config).to(dtype).save_pretrained(plain_dir)
    model = bnb_reference_model(plain_dir, dtype=dtype, load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
    model.save_pretrained(root / "bnb4", safe_serialization=True)
    return root / "bnb4"


@pytest.fixture(scope="module")
def bnb_checkpoints(tmp_path_factory):
    """compute dtype name -> directory of a bitsandbytes 4-bit checkpoint stored in that dtype (built once)."""
    built = {}

    def get(name: str):
        if name not in built:
            built[name] = _bnb_checkpoint(tmp_path_factory.mktemp(f"bnb-{name}"), getattr(torch, name))
        return built[name]

    return get


@pytest.fixture(scope="module")
def bnb_checkpoint(bnb_checkpoints):
    return None, bnb_checkpoints("float32")


def test_checkpoint_is_in_the_bnb_format(bnb_checkpoint):
    _, quant_dir = bnb_checkpoint
    qconfig = json.loads((quant_dir / "config.json").read_text())["quantization_config"]
    assert qconfig["quant_method"] == "bitsandbytes" and qconfig["load_in_4bit"]
    from safetensors.torch import load_file

    state = load_file(quant_dir / "model.safetensors")
    assert "model.layers.0.self_attn.q_proj.weight.quant_state.bitsandbytes__nf4" in state
    assert state["model.layers.0.self_attn.q_proj.weight"].dtype == torch.uint8


def test_same_logits_as_bitsandbytes(bnb_checkpoints, compute_dtype):
    """The same stored bytes, the same ops (dequantize, then torch's matmul in the compute dtype): equal logits.

    bitsandbytes runs on its exact path (`bnb_reference`: its AVX512-BF16 kernel off); both sides
    then round the same values the same way, so the logits agree bit for bit in either regime.
    """
    quant_dir = bnb_checkpoints(compute_dtype)
    dtype = getattr(torch, compute_dtype)
    loaded = load_model(quant_dir, QuantSettings(compute_dtype=compute_dtype))
    assert count_nf4(loaded) == 14
    assert not hasattr(loaded.config, "quantization_config")
    theirs_model = bnb_reference_model(quant_dir, dtype=dtype)
    input_ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = loaded(input_ids).logits
        theirs = theirs_model(input_ids).logits
    assert ours.dtype == theirs.dtype == dtype
    torch.testing.assert_close(ours, theirs, atol=0, rtol=0)


def test_codes_are_the_stored_bytes(bnb_checkpoint):
    """Pre-quantized weights are decoded as stored, never re-quantized."""
    from safetensors.torch import load_file

    _, quant_dir = bnb_checkpoint
    loaded = load_model(quant_dir, QuantSettings(compute_dtype="float32", blocksize=128, double_quant=False))
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
    loaded = load_model(quant_dir, QuantSettings(compute_dtype="float32"))
    assert count_nf4(loaded) == 14
