"""The production engine against the slow pure-torch reference (no bitsandbytes needed).

Also: chunk-size and thread-count invariance, and the errors a user can cause.
"""

from __future__ import annotations

import pytest
import torch

from nibbletune.errors import QuantizationError
from nibbletune.quant import quantize
from nibbletune.quant.blockwise import quantize_blockwise_codes
from nibbletune.quant.codebooks import QUANT_TYPES, quantize_bounds
from nibbletune.quant.dequantize import dequantize_torch
from nibbletune.quant.double_quant import compress_absmax, decompress_absmax
from nibbletune.quant.reference import (
    reference_codes,
    reference_compress_absmax,
    reference_decompress_absmax,
    reference_dequantize_4bit,
    reference_quantize_4bit,
)

pytestmark = pytest.mark.usefixtures("single_thread")

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SHAPES = [(1,), (2,), (63,), (64,), (65,), (1000,), (7, 100), (3, 33), (16, 64), (5, 4096), (300, 70),
          (2, 3, 50), (1, 8193)]
KINDS = ("normal", "cauchy", "zero_blocks", "huge", "subnormal", "mixed_rows", "ties", "constant")


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_production_equals_reference(make, gen, shape, dtype, quant_type):
    for kind, blocksize in zip(KINDS, (32, 64, 128, 256, 512, 1024, 2048, 4096)):
        x = make(kind, shape, dtype, gen)
        for double_quant in (False, True):
            qt = quantize(x, quant_type, blocksize, double_quant=double_quant)
            packed, absmax = reference_quantize_4bit(x, quant_type, blocksize)
            assert qt.packed.shape == ((x.numel() + 1) // 2, 1) and qt.packed.dtype == torch.uint8
            assert torch.equal(qt.packed, packed), (kind, blocksize)
            if double_quant:
                codes, nested, offset = reference_compress_absmax(absmax)
                assert torch.equal(qt.absmax, codes)
                assert torch.equal(qt.nested_absmax, nested)
                assert qt.nested_offset == offset
                absmax = reference_decompress_absmax(codes, nested, offset)
            else:
                assert torch.equal(qt.absmax, absmax)
            assert torch.equal(qt.absmax_float32(), absmax)
            for out_dtype in DTYPES:
                expected = reference_dequantize_4bit(packed, absmax, shape, out_dtype, quant_type, blocksize)
                assert torch.equal(dequantize_torch(qt, out_dtype), expected), (kind, blocksize, out_dtype)
                assert torch.equal(qt.dequantize(out_dtype), expected), (kind, blocksize, out_dtype)
            assert qt.dequantize().dtype == dtype and qt.dequantize().shape == x.shape


def test_dequantize_into_out(gen):
    x = torch.randn(12, 256, generator=gen)
    qt = quantize(x, "nf4", 64)
    out = torch.full((12, 256), float("nan"), dtype=torch.bfloat16)
    result = qt.dequantize(torch.bfloat16, out=out)
    assert result.data_ptr() == out.data_ptr()
    assert torch.equal(out, qt.dequantize(torch.bfloat16))
    again = dequantize_torch(qt, torch.float32, out=torch.empty(12, 256))
    assert torch.equal(again, qt.dequantize(torch.float32))


@pytest.mark.parametrize(
    "out",
    [torch.empty(12, 255), torch.empty(12, 256, dtype=torch.float16), torch.empty(256, 12).t()],
    ids=["shape", "dtype", "noncontiguous"],
)
def test_dequantize_rejects_bad_out(gen, out):
    qt = quantize(torch.randn(12, 256, generator=gen), "nf4", 64)
    with pytest.raises(ValueError, match="out must be"):
        qt.dequantize(torch.float32, out=out)


@pytest.mark.parametrize("dtype", [torch.float64, torch.int32])
def test_dequantize_rejects_bad_dtype(gen, dtype):
    qt = quantize(torch.randn(64, generator=gen))
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        qt.dequantize(dtype)


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("blocksize", [32, 64, 4096])
def test_chunk_size_invariance(gen, quant_type, blocksize):
    x = torch.randn(3 * 4096 + 77, generator=gen) * torch.rand(3 * 4096 + 77, generator=gen)
    midpoints, order = quantize_bounds(quant_type)
    codes, absmax = quantize_blockwise_codes(x, midpoints, order, blocksize)
    ref_codes, ref_absmax = reference_codes(x, midpoints, order, blocksize)
    assert torch.equal(codes.long(), ref_codes) and torch.equal(absmax, ref_absmax)
    for chunk_elements in (1, blocksize - 1, blocksize, blocksize + 1, 3 * blocksize, 5000, 1 << 22):
        chunked_codes, chunked_absmax = quantize_blockwise_codes(
            x, midpoints, order, blocksize, chunk_elements
        )
        assert torch.equal(chunked_codes, codes), chunk_elements
        assert torch.equal(chunked_absmax, absmax), chunk_elements


def test_double_quant_chunk_invariance_and_partial_nested_block(gen):
    """Nested quantization over many blocks, with a partial last nested block, equals the reference."""
    absmax = torch.rand(256 * 5 + 17, generator=gen) * 3
    codes, nested, offset = compress_absmax(absmax)
    ref_codes, ref_nested, ref_offset = reference_compress_absmax(absmax)
    assert torch.equal(codes, ref_codes) and torch.equal(nested, ref_nested) and offset == ref_offset
    assert nested.numel() == 6
    recovered = decompress_absmax(codes, nested, offset)
    assert torch.equal(recovered, reference_decompress_absmax(codes, nested, offset))
    # The dynamic map has 7 exponent levels; relative error stays well under 10% of nested absmax.
    block_of = torch.arange(absmax.numel()) // 256
    assert bool(((recovered - absmax).abs() <= 0.05 * nested[block_of] + 1e-6).all())


def test_thread_count_invariance(gen):
    x = torch.randn(64, 4096, generator=gen)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = quantize(x, "nf4", 64)
        torch.set_num_threads(max(2, threads))
        multi = quantize(x, "nf4", 64)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(single.packed, multi.packed)
    assert torch.equal(single.absmax, multi.absmax) and single.nested_offset == multi.nested_offset


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_finite_rejected(bad, dtype):
    x = torch.randn(4, 64).to(dtype)
    x[2, 5] = bad
    with pytest.raises(QuantizationError, match="NaN or inf"):
        quantize(x)


def test_overflow_in_low_precision_is_caught():
    x = torch.full((64,), 1e5).to(torch.float16)  # overflows to inf when cast
    with pytest.raises(QuantizationError, match="NaN or inf"):
        quantize(x)


@pytest.mark.parametrize("dtype", [torch.float64, torch.int32, torch.int8, torch.uint8, torch.bool])
def test_unsupported_dtype_rejected(dtype):
    x = torch.ones(64, dtype=dtype)
    with pytest.raises(QuantizationError, match=str(dtype)):
        quantize(x)


@pytest.mark.parametrize("shape", [(0,), (0, 64), (64, 0)])
def test_empty_tensor_rejected(shape):
    with pytest.raises(QuantizationError, match="empty"):
        quantize(torch.empty(shape))


def test_zero_dim_tensor_rejected():
    with pytest.raises(QuantizationError, match="0-d"):
        quantize(torch.tensor(1.0))


@pytest.mark.parametrize("blocksize", [0, -64, 16, 48, 100, 8192])
def test_bad_blocksize_rejected(blocksize):
    with pytest.raises(QuantizationError, match="blocksize"):
        quantize(torch.randn(8192), blocksize=blocksize)


@pytest.mark.parametrize("quant_type", ["int8", "INT4", "NF4", "", None, "af4"])
def test_bad_quant_type_rejected(quant_type):
    with pytest.raises(QuantizationError, match="quant_type"):
        quantize(torch.randn(64), quant_type=quant_type)


def test_not_a_tensor_rejected():
    with pytest.raises(QuantizationError, match="torch.Tensor"):
        quantize([1.0] * 64)


def test_requires_grad_tensor_quantizes_detached():
    w = torch.randn(4, 64, requires_grad=True)
    qt = quantize(w)
    assert not qt.packed.requires_grad and not qt.dequantize().requires_grad
    assert torch.equal(qt.packed, quantize(w.detach()).packed)
