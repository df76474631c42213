"""Codebooks, midpoints and the double-quant map against the installed bitsandbytes."""

from __future__ import annotations

import pytest
import torch

from nibbletune.quant import bits_per_parameter, codebook, dynamic_map
from nibbletune.quant.codebooks import dynamic_map_midpoints, quantize_bounds


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_codebook_equals_bnb(bnb, quant_type):
    expected = bnb.functional.get_4bit_type(quant_type, device="cpu")
    ours = codebook(quant_type)
    assert ours.dtype == torch.float32 and ours.shape == (16,)
    assert torch.equal(ours, expected)


def test_nf4_codebook_shape_of_values():
    values = codebook("nf4")
    assert values[0] == -1.0 and values[15] == 1.0 and values[7] == 0.0
    assert bool((values[1:] > values[:-1]).all()), "NF4 must be strictly increasing"


def test_fp4_codebook_is_sign_mirrored():
    values = codebook("fp4")
    assert torch.equal(values[8:], -values[:8])
    magnitudes = torch.tensor([0, 0.0625, 8, 12, 4, 6, 2, 3], dtype=torch.float32) / 12
    assert torch.equal(values[:8], magnitudes)


def test_dynamic_map_equals_bnb(bnb):
    expected = bnb.functional.create_dynamic_map(signed=True)
    ours = dynamic_map()
    assert ours.shape == (256,) and ours.dtype == torch.float32
    assert torch.equal(ours, expected)
    assert ours[-1] == 1.0 and bool((ours == 0).any())
    assert bool((ours[1:] > ours[:-1]).all()), "the dynamic map must be sorted without duplicates"


def test_dynamic_map_midpoints_match_bnb_default_backend(bnb):
    code = bnb.functional.create_dynamic_map(signed=True)
    assert torch.equal(dynamic_map_midpoints(), (code[:-1] + code[1:]) / 2)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_quantize_bounds_equal_bnb(bnb, quant_type):
    from bitsandbytes.backends.default.ops import _get_4bit_quantize_bounds

    expected_mid, expected_order = _get_4bit_quantize_bounds(quant_type, torch.device("cpu"))
    midpoints, order = quantize_bounds(quant_type)
    assert torch.equal(midpoints, expected_mid)
    assert order.tolist() == expected_order.tolist()
    assert bool((midpoints[1:] >= midpoints[:-1]).all())


def test_nf4_order_is_identity():
    assert quantize_bounds("nf4")[1].tolist() == list(range(16))


def test_unknown_quant_type_rejected():
    with pytest.raises(ValueError, match="quant_type"):
        codebook("int8")


def test_bits_per_parameter():
    assert bits_per_parameter(64, False) == 4.5
    assert bits_per_parameter(64, True) == pytest.approx(4.127, abs=1e-3)
    assert bits_per_parameter(64, True) == 4 + 8 / 64 + 32 / (64 * 256)
