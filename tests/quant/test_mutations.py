"""The differential suite proves its own power: planted bugs must make it fail.

Each test swaps one engine function for a mutant (monkeypatch, undone after the test), runs
the same check the differential tests use (`bnb_oracle.mismatches`, plus the pure-torch
reference), and asserts that the check now reports a difference. A control run first shows
the same check passes on the real engine, so a failure is caused by the mutation.

Mutations: (a) swapped nibbles; (b) off-by-one block assignment of absmax (block boundaries
shifted by one element, absmax stored one block late, decode with the next block's absmax);
(c) wrong midpoint rule (ties to the upper code; nearest by argmin with ties to the upper code;
argmin over FP4's unsorted codebook).
"""

from __future__ import annotations

import pytest
import torch

import nibbletune.quant.dequantize as dequantize_module
import nibbletune.quant.tensor as tensor_module
from nibbletune.quant import quantize
from nibbletune.quant.blockwise import _scale_chunk, pack_nibbles, quantize_blockwise_codes
from nibbletune.quant.codebooks import codebook
from nibbletune.quant.reference import reference_quantize_4bit

pytestmark = pytest.mark.usefixtures("single_thread")

SHAPE = (48, 256)


def _check(oracle, x, quant_type, blocksize=64, double_quant=False):
    """The differential check: bnb's bytes/absmax/values, and the reference's bytes and absmax."""
    problems = oracle.mismatches(x, quant_type, blocksize, double_quant=double_quant)
    qt = quantize(x, quant_type, blocksize, double_quant=False)
    packed, absmax = reference_quantize_4bit(x, quant_type, blocksize)
    if not torch.equal(qt.packed, packed):
        problems.append("reference bytes differ")
    if not torch.equal(qt.absmax, absmax):
        problems.append("reference absmax differs")
    return problems


@pytest.fixture
def normal(gen):
    return torch.randn(SHAPE, generator=gen) * torch.rand(SHAPE[0], 1, generator=gen)


@pytest.fixture
def ties(make, gen):
    return make("ties", SHAPE, torch.float32, gen)


# ----------------------------------------------------------------------------- (a) nibbles


def _swapped_pack(codes, pad_code):
    packed = pack_nibbles(codes, pad_code)
    return ((packed & 0x0F) << 4) | (packed >> 4)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_swapped_nibbles_are_caught(bnb_oracle, monkeypatch, normal, quant_type):
    assert _check(bnb_oracle, normal, quant_type) == []
    monkeypatch.setattr(tensor_module, "pack_nibbles", _swapped_pack)
    problems = _check(bnb_oracle, normal, quant_type)
    assert "packed bytes differ" in " ".join(problems)
    assert "dequantized values differ" in problems
    assert "reference bytes differ" in problems


# ----------------------------------------------------------------------------- (b) off-by-one blocks


def _shifted_blocks(flat, midpoints, order, blocksize, chunk_elements=1 << 22):
    """Blocks start one element early: the first block holds blocksize - 1 elements."""
    padded = torch.cat([flat[:1] * 0, flat])
    codes, absmax = quantize_blockwise_codes(padded, midpoints, order, blocksize, chunk_elements)
    blocks = -(-flat.numel() // blocksize)
    return codes[1:], absmax[:blocks]


def _absmax_one_block_late(flat, midpoints, order, blocksize, chunk_elements=1 << 22):
    codes, absmax = quantize_blockwise_codes(flat, midpoints, order, blocksize, chunk_elements)
    return codes, torch.roll(absmax, 1)


def _decode_with_next_block(qt, dtype, out=None):
    n = qt.numel
    codes = torch.stack([qt.packed.reshape(-1) >> 4, qt.packed.reshape(-1) & 15], 1).reshape(-1)[:n]
    values = qt.quant_map[codes.long()]
    block_of = (torch.arange(n) // qt.blocksize + 1).clamp(max=qt.num_blocks - 1)
    return (values * qt.absmax_float32()[block_of]).to(dtype).reshape(qt.shape)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_block_boundaries_off_by_one_are_caught(bnb_oracle, monkeypatch, normal, quant_type):
    assert _check(bnb_oracle, normal, quant_type) == []
    monkeypatch.setattr(tensor_module, "quantize_blockwise_codes", _shifted_blocks)
    problems = _check(bnb_oracle, normal, quant_type)
    assert "absmax differs" in problems and "reference absmax differs" in problems
    assert any(p.startswith("packed bytes differ") for p in problems)


@pytest.mark.parametrize("double_quant", [False, True])
def test_absmax_stored_one_block_late_is_caught(bnb_oracle, monkeypatch, normal, double_quant):
    assert _check(bnb_oracle, normal, "nf4", double_quant=double_quant) == []
    monkeypatch.setattr(tensor_module, "quantize_blockwise_codes", _absmax_one_block_late)
    problems = _check(bnb_oracle, normal, "nf4", double_quant=double_quant)
    assert "reference absmax differs" in problems
    if double_quant:
        assert any(p.startswith("absmax codes differ") for p in problems)
    else:
        assert "absmax differs" in problems and "dequantized values differ" in problems


def test_decoding_with_the_next_blocks_absmax_is_caught(bnb_oracle, monkeypatch, normal):
    monkeypatch.setenv("NIBBLETUNE_NO_KERNELS", "1")  # route dequantize() through dequantize_torch
    assert _check(bnb_oracle, normal, "nf4") == []
    monkeypatch.setattr(dequantize_module, "dequantize_torch", _decode_with_next_block)
    assert _check(bnb_oracle, normal, "nf4") == ["dequantized values differ"]


# ----------------------------------------------------------------------------- (c) midpoint rule


def _coder(rule):
    """A quantize_blockwise_codes with the same scaling and a different nearest-code rule."""

    def mutant(flat, midpoints, order, blocksize, chunk_elements=1 << 22):
        absmax, scaled = _scale_chunk(flat, 0, flat.numel(), blocksize)
        sorted_values = codebook("nf4") if order is None else codebook("fp4")[order.long()]
        if rule == "ties_to_upper":
            position = torch.bucketize(scaled, midpoints, right=True)
        elif rule == "argmin_ties_to_upper":
            distance = (scaled[:, None] - sorted_values[None, :]).abs()
            position = 15 - distance.flip(1).argmin(dim=1)
        elif rule == "argmin_unsorted":
            values = codebook("nf4") if order is None else codebook("fp4")
            codes = (scaled[:, None] - values[None, :]).abs().argmin(dim=1)
            return codes.to(torch.uint8), absmax
        else:
            raise ValueError(rule)
        codes = order[position] if order is not None else position.to(torch.uint8)
        return codes.to(torch.uint8), absmax

    return mutant


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("rule", ["ties_to_upper", "argmin_ties_to_upper"])
def test_wrong_tie_rule_is_caught(bnb_oracle, monkeypatch, ties, normal, quant_type, rule):
    assert _check(bnb_oracle, ties, quant_type) == []
    monkeypatch.setattr(tensor_module, "quantize_blockwise_codes", _coder(rule))
    if quant_type == "nf4":
        # On continuous data exact ties are (almost) never hit, which is why the suite has tie
        # data. (FP4's two zero codes tie for every small value, so there normal data catches
        # the argmin mutant too.)
        assert _check(bnb_oracle, normal, quant_type) == []
    problems = _check(bnb_oracle, ties, quant_type)
    assert any(p.startswith("packed bytes differ") for p in problems)
    assert "dequantized values differ" in problems and "reference bytes differ" in problems


def test_argmin_over_the_unsorted_fp4_codebook_is_caught(bnb_oracle, monkeypatch, normal):
    """FP4 has two zero codes; bnb gives small positive values code 8, a first-index argmin code 0."""
    monkeypatch.setattr(tensor_module, "quantize_blockwise_codes", _coder("argmin_unsorted"))
    problems = _check(bnb_oracle, normal * 1e3, "fp4")  # bytes differ, values agree (+0 either way)
    assert any(p.startswith("packed bytes differ") for p in problems)
    assert "reference bytes differ" in problems


def test_mutants_are_gone_after_the_test():
    """monkeypatch undid every mutation: the engine module holds the real functions again."""
    assert tensor_module.quantize_blockwise_codes is quantize_blockwise_codes
    assert tensor_module.pack_nibbles is pack_nibbles
    assert dequantize_module.dequantize_torch.__module__ == "nibbletune.quant.dequantize"
