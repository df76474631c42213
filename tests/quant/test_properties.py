"""Hypothesis properties of the 4-bit engine (no bitsandbytes needed)."""

from __future__ import annotations

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from nibbletune.quant import codebook, quantize  # noqa: E402
from nibbletune.quant.blockwise import unpack_nibbles  # noqa: E402
from nibbletune.quant.codebooks import QUANT_TYPES, quantize_bounds  # noqa: E402
from nibbletune.quant.reference import _scale  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")

PROPERTY_SETTINGS = settings(max_examples=60, deadline=None, derandomize=True)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Largest magnitude drawn per dtype (float16 overflows at 65504).
LIMIT = {torch.float32: 1e30, torch.float16: 6e4, torch.bfloat16: 1e30}


def max_half_gap(quant_type: str) -> float:
    values = torch.sort(codebook(quant_type)).values
    return float((values[1:] - values[:-1]).max()) / 2


@st.composite
def tensors(draw, min_magnitude: float = 0.0):
    """(tensor, quant_type, blocksize): 1-D or 2-D, float32/16/bf16, no NaN/inf, no float32 subnormals.

    Subnormal float32 absmax values are excluded on purpose: the format (like bitsandbytes)
    clamps the divisor to 1e-38, so such blocks decode near zero; test_quantize_vs_bnb covers
    their bytes. Blocks are mixed scales: every element is a unit value times its block's scale.
    """
    dtype = draw(st.sampled_from(DTYPES))
    quant_type = draw(st.sampled_from(QUANT_TYPES))
    blocksize = draw(st.sampled_from([32, 64, 128]))
    n = draw(st.integers(1, 3 * blocksize))
    limit = LIMIT[dtype]
    unit = st.floats(-1, 1, width=32, allow_subnormal=False)
    if min_magnitude:
        unit = st.one_of(st.just(0.0), unit.filter(lambda v: abs(v) >= min_magnitude))
    values = torch.tensor(draw(st.lists(unit, min_size=n, max_size=n)), dtype=torch.float32)
    blocks = -(-n // blocksize)
    exponents = torch.tensor(draw(st.lists(st.integers(-30, 30), min_size=blocks, max_size=blocks)))
    scales = torch.pow(10.0, exponents.double()).clamp(max=limit).float()
    x = values * scales.repeat_interleave(blocksize)[:n]
    if dtype == torch.float16:
        x = x.clamp(-limit, limit)
    x = x.to(dtype)
    if dtype != torch.float16:  # no float32 subnormals, also not after the cast
        x = torch.where(x.float().abs() < torch.finfo(torch.float32).tiny, torch.zeros_like(x), x)
    if draw(st.booleans()) and n % 2 == 0:
        x = x.reshape(2, n // 2)
    return x, quant_type, blocksize


def codes_of(qt) -> torch.Tensor:
    return unpack_nibbles(qt.packed, qt.numel).long()


def block_absmax_per_element(qt) -> torch.Tensor:
    return qt.absmax_float32().repeat_interleave(qt.blocksize)[: qt.numel]


@PROPERTY_SETTINGS
@given(tensors(), st.booleans())
def test_round_trip_error_bounded_by_half_gap(case, double_quant):
    x, quant_type, blocksize = case
    qt = quantize(x, quant_type, blocksize, double_quant=double_quant)
    back = qt.dequantize(torch.float32).reshape(-1)
    absmax = block_absmax_per_element(qt)
    error = (back - x.float().reshape(-1)).abs()
    if double_quant:
        # The scale itself is approximate: the bound uses the true absmax plus the scale error.
        true_absmax = quantize(x, quant_type, blocksize, double_quant=False).absmax
        true_absmax = true_absmax.repeat_interleave(blocksize)[: qt.numel]
        bound = max_half_gap(quant_type) * true_absmax + (absmax - true_absmax).abs()
        bound = bound * (1 + 1e-5) + 1e-6 * true_absmax
    else:
        bound = (max_half_gap(quant_type) + 1e-6) * absmax
    assert bool((error <= bound).all()), float((error - bound).max())


@PROPERTY_SETTINGS
@given(tensors(min_magnitude=1e-2), st.booleans())
def test_requantizing_the_dequantized_tensor_keeps_the_codes(case, double_quant):
    """quantize(dequantize(q)) has q's codes, with two legitimate exceptions.

    * FP4 has two codes for zero: 0 (+0) and 8 (bitsandbytes' "-0", which decodes to +0.0
      too). Small positive scaled values take code 8 (sorted position 8), an exact zero takes
      code 0, so a code-8 element comes back as code 0: same value, different code.
    * With double quantization a block whose absmax is small next to the spread of all absmax
      values can recover a negative (or zero) scale, map[code] * nested_absmax + offset < 0
      (bitsandbytes computes the same; see test_quantize_vs_bnb). Its dequantized values are
      sign-flipped, so its codes cannot survive. Idempotence is asserted on blocks whose
      recovered scale is positive.

    And one exemption: an element whose decoded value lies below the smallest normal number of
    a 16-bit dtype is rounded on the absolute subnormal grid (or to zero) on the way out, e.g.
    FP4's 0.0052 * 1.0e-6 becomes 0.0 in float16, so it may come back with a neighbouring code.
    """
    x, quant_type, blocksize = case
    qt = quantize(x, quant_type, blocksize, double_quant=double_quant)
    again = quantize(qt.dequantize(), quant_type, blocksize, double_quant=double_quant)
    codes, codes_again = codes_of(qt), codes_of(again)
    expected = codes.clone()
    if quant_type == "fp4":
        expected[expected == 8] = 0
    positive_scale = block_absmax_per_element(qt) > 0
    zero_block = block_absmax_per_element(quantize(x, quant_type, blocksize, False)) == 0
    keep = positive_scale | zero_block if not double_quant else positive_scale
    decoded = qt.dequantize(torch.float32).flatten().abs()
    subnormal_on_output = (decoded > 0) & (decoded < torch.finfo(x.dtype).tiny)
    compared = keep & ~subnormal_on_output
    assert torch.equal(codes_again[compared], expected[compared])
    if not double_quant:
        assert bool(keep.all())
        if x.dtype == torch.float32:  # no rounding on the way back: the values are a fixed point too
            assert torch.equal(again.dequantize(), qt.dequantize())


@PROPERTY_SETTINGS
@given(tensors(), st.sampled_from(["fp4", "int4"]))
def test_symmetric_codebooks_are_sign_symmetric_except_on_exact_ties(case, quant_type):
    """FP4 and INT4 are mirror-symmetric code books: quantizing -x gives -(the values of x), off midpoints."""
    x, _, blocksize = case
    qt, mirrored = quantize(x, quant_type, blocksize, False), quantize(-x, quant_type, blocksize, False)
    _, scaled = _scale(x.float().reshape(-1), blocksize)
    midpoints = quantize_bounds(quant_type)[0]
    off_tie = ~(scaled[:, None] == midpoints[None, :]).any(dim=1)
    back = qt.dequantize(torch.float32).reshape(-1)
    back_mirrored = mirrored.dequantize(torch.float32).reshape(-1)
    assert torch.equal(back_mirrored[off_tie], -back[off_tie])


@PROPERTY_SETTINGS
@given(tensors())
def test_nf4_keeps_signs_and_is_symmetric_where_its_codebook_is(case):
    """NF4 is asymmetric (-0.696 vs 0.723, 7 negative vs 8 positive values), so -x only mirrors
    x where both signs land on the same magnitude: near zero (both code 7) and near +-1."""
    x, _, blocksize = case
    flat = x.float().reshape(-1)
    qt, mirrored = quantize(x, "nf4", blocksize, False), quantize(-x, "nf4", blocksize, False)
    back = qt.dequantize(torch.float32).reshape(-1)
    back_mirrored = mirrored.dequantize(torch.float32).reshape(-1)
    assert bool((back * flat >= 0).all()), "a dequantized value changed sign"
    _, scaled = _scale(flat, blocksize)
    midpoints = quantize_bounds("nf4")[0]
    near_zero = scaled.abs() < min(-midpoints[6], midpoints[7])
    near_one = scaled.abs() > max(-midpoints[0], midpoints[14])
    symmetric = near_zero | near_one
    assert torch.equal(back_mirrored[symmetric], -back[symmetric])
    absmax = block_absmax_per_element(qt)
    extreme = flat.abs() == absmax
    assert torch.equal(back[extreme].abs(), absmax[extreme])


def test_nf4_asymmetry_is_real():
    """Why the NF4 property above is partial: a value and its negation decode differently."""
    x = torch.tensor([1.0, 0.7, -1.0, -0.7] * 16)
    back = quantize(x, "nf4", 64, False).dequantize()
    assert back[1] != -back[3]


@PROPERTY_SETTINGS
@given(tensors(), st.booleans())
def test_to_cpu_keeps_bytes_and_values(case, double_quant):
    x, quant_type, blocksize = case
    qt = quantize(x, quant_type, blocksize, double_quant=double_quant)
    moved = qt.to("cpu")
    assert moved is not qt
    assert torch.equal(moved.packed, qt.packed) and torch.equal(moved.absmax, qt.absmax)
    assert moved.nested_offset == qt.nested_offset
    assert torch.equal(moved.dequantize(), qt.dequantize())
    assert moved.shape == x.shape and moved.dtype == x.dtype


@PROPERTY_SETTINGS
@given(tensors())
def test_codes_index_the_nearest_codebook_value(case):
    """Independently of midpoints: every code is a nearest codebook value to its scaled element."""
    x, quant_type, blocksize = case
    qt = quantize(x, quant_type, blocksize, False)
    _, scaled = _scale(x.float().reshape(-1), blocksize)
    values = codebook(quant_type)
    distance = (scaled[:, None] - values[None, :]).abs()
    chosen = distance.gather(1, codes_of(qt)[:, None]).squeeze(1)
    # Float32 midpoints round: allow a distance tie within one ulp of the midpoint.
    assert bool((chosen <= distance.min(dim=1).values + 1e-7).all())
