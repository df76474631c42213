"""The bitsandbytes state-dict layout: what we write equals what bitsandbytes writes, and back."""

from __future__ import annotations

import json

import pytest
import torch

from nibbletune.errors import FormatError
from nibbletune.quant import codebook, from_bnb_state_dict, quantize, to_bnb_state_dict
from nibbletune.quant.bnb_format import (
    QUANT_STATE_KEY,
    bnb_state_keys,
    is_bnb_quantized,
    pack_json,
    unpack_json,
)

PREFIX = "model.layers.0.mlp.up_proj.weight"


def _strip(entries: dict, prefix: str) -> dict:
    return {k[len(prefix) + 1:]: v for k, v in entries.items() if k != prefix}


def _bnb_entries(bnb, x, quant_type, blocksize, double_quant, prefix=PREFIX):
    """bitsandbytes' own state-dict entries for `x`: packed weight plus QuantState.as_dict(packed=True)."""
    packed, state = bnb.functional.quantize_4bit(
        x, blocksize=blocksize, quant_type=quant_type, compress_statistics=double_quant
    )
    entries = {prefix: packed}
    entries.update({f"{prefix}.{k}": v for k, v in state.as_dict(packed=True).items()})
    return entries, packed, state


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_to_bnb_state_dict_equals_bnb_as_dict(bnb, gen, dtype, quant_type, double_quant):
    x = torch.randn(96, 320, generator=gen).to(dtype)
    ours = to_bnb_state_dict(quantize(x, quant_type, 64, double_quant), PREFIX)
    theirs, _, _ = _bnb_entries(bnb, x, quant_type, 64, double_quant)
    assert set(ours) == set(theirs)
    state_key = f"{PREFIX}.{QUANT_STATE_KEY}{quant_type}"
    assert json.loads(bytes(ours[state_key].tolist())) == json.loads(bytes(theirs[state_key].tolist()))
    assert unpack_json(ours[state_key]) == unpack_json(theirs[state_key])
    for key, expected in theirs.items():
        got = ours[key]
        assert got.dtype == expected.dtype and got.shape == expected.shape, key
        if key == state_key:
            assert torch.equal(got, expected), "the JSON bytes differ (key order or formatting)"
            continue
        if key == f"{PREFIX}.absmax" and double_quant:
            # Exact-nearest vs bnb CPU's lookup table: a small fraction of 8-bit codes differ.
            assert (got != expected).float().mean() < 0.01
        else:
            assert torch.equal(got, expected), key


def test_json_fields(gen):
    qt = quantize(torch.randn(4, 3, 64, generator=gen).to(torch.bfloat16), "fp4", 128, double_quant=True)
    meta = unpack_json(to_bnb_state_dict(qt, "w")[f"w.{QUANT_STATE_KEY}fp4"])
    assert meta == {
        "quant_type": "fp4",
        "blocksize": 128,
        "dtype": "bfloat16",
        "shape": [4, 3, 64],
        "nested_blocksize": 256,
        "nested_dtype": "float32",
        "nested_offset": qt.nested_offset,
    }


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("shape", [(64, 256), (300, 128), (4096,)], ids=str)
def test_from_bnb_as_dict_dequantizes_to_bnb_values(bnb, gen, shape, quant_type, double_quant):
    x = torch.randn(shape, generator=gen) * 3
    entries, packed, state = _bnb_entries(bnb, x, quant_type, 64, double_quant)
    qt = from_bnb_state_dict(entries, PREFIX)
    assert qt.shape == x.shape and qt.dtype == x.dtype and qt.blocksize == 64 and qt.quant_type == quant_type
    assert qt.double_quant == double_quant
    assert torch.equal(qt.packed, packed)
    expected = bnb.functional.dequantize_4bit(packed, state).reshape(shape)
    assert torch.equal(qt.dequantize(), expected)
    if double_quant:
        assert qt.nested_offset == state.offset.item()
        expected_absmax = bnb.functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
        assert torch.equal(qt.absmax_float32(), expected_absmax)


@pytest.mark.parametrize("quant_storage", [torch.uint8, torch.bfloat16])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_from_bnb_linear4bit_state_dict(bnb, gen, quant_type, double_quant, quant_storage):
    linear = torch.nn.Linear(192, 48)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(48, 192, generator=gen))
    module = bnb.nn.Linear4bit(
        192, 48, bias=True, compute_dtype=torch.float32, compress_statistics=double_quant,
        quant_type=quant_type, quant_storage=quant_storage,
    )
    module.load_state_dict(linear.state_dict())
    model = torch.nn.Sequential(torch.nn.Identity(), module).to("cpu")  # quantizes on the move
    state_dict = model.state_dict()  # read before any forward (bnb may repack weights in place)
    prefix = "1.weight"
    assert is_bnb_quantized(state_dict, prefix)
    assert set(bnb_state_keys(prefix, state_dict)) == {k for k in state_dict if k.startswith(prefix)}
    qt = from_bnb_state_dict(state_dict, prefix)
    weight = model[1].weight
    expected = bnb.functional.dequantize_4bit(weight.data, weight.quant_state)
    assert torch.equal(qt.dequantize(), expected)
    # Our own quantization of the same float weight gives the same 4-bit codes.
    assert torch.equal(quantize(linear.weight.detach(), quant_type, 64, double_quant).packed, qt.packed)


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_round_trip_ours_dict_ours(gen, quant_type, double_quant):
    x = torch.randn(33, 70, generator=gen).to(torch.float16)
    qt = quantize(x, quant_type, 128, double_quant)
    back = from_bnb_state_dict(to_bnb_state_dict(qt, "a.b"), "a.b")
    assert torch.equal(back.packed, qt.packed) and torch.equal(back.absmax, qt.absmax)
    assert back.shape == qt.shape and back.dtype == qt.dtype and back.blocksize == qt.blocksize
    assert back.quant_type == qt.quant_type and back.nested_offset == qt.nested_offset
    if double_quant:
        assert torch.equal(back.nested_absmax, qt.nested_absmax)
    assert torch.equal(back.dequantize(), qt.dequantize())


def test_state_dicts_of_several_weights_share_no_memory(gen, tmp_path):
    """safetensors refuses tensors that share memory; each entry must own its storage."""
    safetensors = pytest.importorskip("safetensors.torch")
    entries = {}
    for i in range(3):
        qt = quantize(torch.randn(8, 64, generator=gen), "nf4", 64, double_quant=True)
        entries.update(to_bnb_state_dict(qt, f"layers.{i}.weight"))
    safetensors.save_file(entries, str(tmp_path / "model.safetensors"))
    loaded = safetensors.load_file(str(tmp_path / "model.safetensors"))
    for i in range(3):
        prefix = f"layers.{i}.weight"
        assert torch.equal(from_bnb_state_dict(loaded, prefix).dequantize(),
                           from_bnb_state_dict(entries, prefix).dequantize())


def test_codebook_cache_cannot_be_corrupted():
    codebook("nf4").mul_(2)
    to_bnb_state_dict(quantize(torch.randn(64)), "w")["w.quant_map"].zero_()
    assert codebook("nf4")[0] == -1.0 and codebook("nf4")[15] == 1.0


# ----------------------------------------------------------------------------- corrupt inputs


@pytest.fixture
def entries(gen):
    return to_bnb_state_dict(quantize(torch.randn(10, 64, generator=gen), "nf4", 64, True), "w")


def _meta(entries):
    return unpack_json(entries[f"w.{QUANT_STATE_KEY}nf4"])


def _with_state(entries, tensor):
    entries[f"w.{QUANT_STATE_KEY}nf4"] = tensor


def _with_meta(entries, **changes):
    meta = _meta(entries)
    meta.update(changes)
    entries[f"w.{QUANT_STATE_KEY}nf4"] = pack_json(meta)
    return entries


CORRUPTIONS = {
    "missing absmax": (lambda e: e.pop("w.absmax"), "missing 'w.absmax'"),
    "missing packed": (lambda e: e.pop("w"), "missing 'w'"),
    "missing nested_absmax": (lambda e: e.pop("w.nested_absmax"), "missing 'w.nested_absmax'"),
    "missing quant_map": (lambda e: e.pop("w.quant_map"), "missing 'w.quant_map'"),
    "no quant_state": (lambda e: e.pop(f"w.{QUANT_STATE_KEY}nf4"), "exactly one"),
    "two quant_states": (
        lambda e: e.__setitem__(f"w.{QUANT_STATE_KEY}fp4", e[f"w.{QUANT_STATE_KEY}nf4"]), "exactly one"
    ),
    "fp4 codebook": (lambda e: e.__setitem__("w.quant_map", codebook("fp4")), "quant_map"),
    "perturbed codebook": (lambda e: e["w.quant_map"].__setitem__(3, 0.5), "quant_map"),
    "wrong nested map": (
        lambda e: e.__setitem__("w.nested_quant_map", torch.linspace(-1, 1, 256)), "nested_quant_map"
    ),
    "packed too short": (lambda e: e.__setitem__("w", e["w"][:-1]), "packed"),
    "packed too long": (lambda e: e.__setitem__("w", torch.cat([e["w"], e["w"][:1]])), "packed"),
    "absmax count": (lambda e: e.__setitem__("w.absmax", e["w.absmax"][:-1]), "absmax"),
    "nested count": (lambda e: e.__setitem__("w.nested_absmax", torch.ones(2)), "nested"),
    "float absmax with nested": (lambda e: e.__setitem__("w.absmax", e["w.absmax"].float()), "dtype"),
    "bad json": (lambda e: _with_state(e, torch.tensor(list(b"{not json"), dtype=torch.uint8)), "JSON"),
    "not utf8": (lambda e: _with_state(e, torch.tensor([255, 0], dtype=torch.uint8)), "JSON"),
    "json list": (lambda e: _with_state(e, pack_json([1, 2])), "malformed"),
    "no shape": (lambda e: _with_meta(e, shape=None), "malformed"),
    "bad quant_type": (lambda e: _with_meta(e, quant_type="int4"), "quant_type"),
    "bad dtype name": (lambda e: _with_meta(e, dtype="float99"), "malformed"),
    "int dtype": (lambda e: _with_meta(e, dtype="int8"), "dtype"),
    "blocksize zero": (lambda e: _with_meta(e, blocksize=0), "blocksize"),
    "blocksize odd": (lambda e: _with_meta(e, blocksize=100), "blocksize"),
    "negative shape": (lambda e: _with_meta(e, shape=[-10, -64]), "shape"),
    "shape mismatch": (lambda e: _with_meta(e, shape=[11, 64]), "packed"),
    "nested blocksize": (lambda e: _with_meta(e, nested_blocksize=128), "nested_blocksize"),
    "null offset": (lambda e: _with_meta(e, nested_offset=None), "malformed"),
}


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_corrupt_entries_raise_format_error(entries, name):
    corrupt, message = CORRUPTIONS[name]
    from_bnb_state_dict(entries, "w")  # intact entries load
    corrupt(entries)
    with pytest.raises(FormatError, match=message):
        from_bnb_state_dict(entries, "w")


def test_float_absmax_expected_without_double_quant(gen):
    entries = to_bnb_state_dict(quantize(torch.randn(128, generator=gen), "fp4", 64, False), "w")
    entries["w.absmax"] = entries["w.absmax"].half()
    with pytest.raises(FormatError, match="float32"):
        from_bnb_state_dict(entries, "w")


def test_missing_prefix_is_not_quantized(entries):
    assert is_bnb_quantized(entries, "w")
    assert not is_bnb_quantized(entries, "v")
    assert bnb_state_keys("v", entries) == []
