"""The compiled CPU kernel against the slow reference (bit for bit) and bitsandbytes.

Every comparison is on bit patterns (`_bits`), so NaN outputs compare too and -0.0 != +0.0.
The whole module skips when the kernel cannot be built (no C compiler).
"""

from __future__ import annotations

import logging

import pytest
import torch

from nibbletune.errors import QuantizationError
from nibbletune.quant import QuantizedTensor, cpu_kernel, quantize
from nibbletune.quant.blockwise import SUPPORTED_BLOCKSIZES
from nibbletune.quant.codebooks import NESTED_BLOCKSIZE
from nibbletune.quant.dequantize import dequantize_4bit
from nibbletune.quant.reference import reference_decompress_absmax, reference_dequantize_4bit

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INT_OF = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


@pytest.fixture(scope="module", autouse=True)
def _kernel():
    if not cpu_kernel.cpu_kernel_available():
        pytest.skip("the C kernel could not be built (no C compiler?)")


@pytest.fixture
def threads():
    """Restores torch's thread count after a test that changes it."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(_INT_OF[t.dtype])


def _reference(qt: QuantizedTensor, dtype: torch.dtype) -> torch.Tensor:
    if qt.double_quant:
        absmax = reference_decompress_absmax(qt.absmax, qt.nested_absmax, qt.nested_offset)
    else:
        absmax = qt.absmax
    return reference_dequantize_4bit(qt.packed, absmax, qt.shape, dtype, qt.quant_type, qt.blocksize)


def _assert_matches_reference(qt: QuantizedTensor, dtypes=DTYPES) -> None:
    for dtype in dtypes:
        got = cpu_kernel.dequantize_cpu(qt, dtype)
        expected = _reference(qt, dtype)
        assert got.shape == qt.shape and got.dtype == dtype
        assert torch.equal(_bits(got), _bits(expected)), f"{qt!r} -> {dtype}"


def _random_qt(gen, shape, blocksize: int, quant_type: str, double_quant: bool) -> QuantizedTensor:
    """Random packed bytes with float32 absmax drawn from raw bit patterns (NaN/inf/subnormal included)."""
    shape = torch.Size(shape)
    numel = shape.numel()
    blocks = -(-numel // blocksize)
    packed = torch.randint(0, 256, ((numel + 1) // 2, 1), generator=gen, dtype=torch.uint8)
    if double_quant:
        codes = torch.randint(0, 256, (blocks,), generator=gen, dtype=torch.uint8)
        nested = torch.randn(-(-blocks // NESTED_BLOCKSIZE), generator=gen) * 10
        return QuantizedTensor(packed, codes, shape, torch.float32, blocksize, quant_type, nested, 0.37)
    bit_patterns = torch.randint(-(2**31), 2**31 - 1, (blocks,), generator=gen, dtype=torch.int32)
    absmax = bit_patterns.view(torch.float32)
    return QuantizedTensor(packed, absmax, shape, torch.float32, blocksize, quant_type)


SHAPES = [
    (1,), (2,), (7,), (31,), (33,), (64,), (65,), (3, 5), (17, 33), (100, 70), (2, 3, 129), (1, 4097),
    (257, 3),
]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int4"])
@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
def test_quantized_weights_match_reference(gen, make, shape, quant_type, double_quant):
    """Odd numel, 1-D, tiny, widths not a multiple of the blocksize, one partial block."""
    qt = quantize(make("normal", shape, torch.float32, gen), quant_type, 64, double_quant)
    _assert_matches_reference(qt)


@pytest.mark.parametrize("blocksize", SUPPORTED_BLOCKSIZES)
@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
def test_every_blocksize_with_partial_last_block(gen, make, blocksize, double_quant):
    # > 256 blocks for small blocksizes (several nested blocks); a partial last block always
    numel = min(blocksize * 260, 70_000) + 37
    qt = quantize(make("student_t", (numel,), torch.bfloat16, gen), "nf4", blocksize, double_quant)
    _assert_matches_reference(qt)


EXTREME_KINDS = ["huge", "near_max", "tiny", "subnormal", "mixed_rows", "ties", "zero_blocks"]


@pytest.mark.parametrize("kind", EXTREME_KINDS)
def test_extreme_values_from_quantize(gen, make, kind):
    """fp16 overflow and subnormals, bf16 overflow: scales far outside the 16-bit ranges."""
    qt = quantize(make(kind, (96, 160), torch.float32, gen), "nf4", 32, False)
    _assert_matches_reference(qt)


@pytest.mark.parametrize("blocksize", [32, 64, 4096])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int4"])
@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
def test_random_bit_pattern_scales(gen, blocksize, quant_type, double_quant):
    """absmax from every float32 bit pattern: NaN, inf, -0, subnormals, values rounding to ties."""
    qt = _random_qt(gen, (7, 10_001) if blocksize != 4096 else (70_001,), blocksize, quant_type, double_quant)
    _assert_matches_reference(qt)


def _rounding_edge_qts() -> list[QuantizedTensor]:
    """Scales chosen so codebook[c] * scale lands on fp16/bf16 rounding ties, overflow and subnormals.

    One tensor with every scale as a full 64-element block (the vector path), and per scale one
    31-element tensor (a tail shorter than 32 elements: the scalar path).
    """
    patterns = [0x3F808000, 0x3F818000, 0x7F7F8000, 0x7F7FFFFF, 0x477FF000, 0x477FEFFF, 0x477FE000,
                0x33000000, 0x33000001, 0x33800000, 0x387FC000, 0x38800000, 0x00000001, 0x80000000,
                0xFF800000, 0x7F800000, 0x7FC00000, 0x7FA00001, 0xFFC12345]
    ints = torch.tensor([p - 2**32 if p >= 2**31 else p for p in patterns], dtype=torch.int64).to(torch.int32)
    absmax = torch.cat([ints.view(torch.float32), torch.logspace(-30, 30, 61, base=2.0)])
    blocks = absmax.numel()
    # every block holds codes 0..15 twice, in both nibbles: bytes 0x01, 0x23, ... and 0x10, 0x32, ...
    block = torch.tensor([16 * (2 * i % 16) + (2 * i + 1) % 16 for i in range(16)], dtype=torch.uint8)
    block = torch.cat([block, (block % 16) * 16 + block // 16])
    packed = block.repeat(blocks).reshape(-1, 1)
    qts = []
    for quant_type in ("nf4", "fp4", "int4"):
        qts.append(QuantizedTensor(packed, absmax, torch.Size((blocks, 64)), torch.float32, 64, quant_type))
        for b in range(blocks):
            qts.append(QuantizedTensor(block[:16].reshape(-1, 1), absmax[b : b + 1], torch.Size((31,)),
                                       torch.float32, 64, quant_type))
    return qts


def test_rounding_edges_for_each_code():
    for qt in _rounding_edge_qts():
        _assert_matches_reference(qt)


def fresh_kernel(monkeypatch):
    """Make the next kernel use build (or fail) again, and restore the loaded one afterwards."""
    monkeypatch.setattr(cpu_kernel.KERNEL, "_library", None)
    monkeypatch.setattr(cpu_kernel.KERNEL, "_failed", False)


def test_scalar_build_matches_reference(gen, monkeypatch, tmp_path):
    """The portable path (no AVX2), built without -march=native, gives the same bits."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(cpu_kernel.KERNEL, "cflags", tuple(f for f in cpu_kernel.CFLAGS if f != "-march=native"))
    fresh_kernel(monkeypatch)
    assert cpu_kernel.simd_level() == "scalar"
    for qt in _rounding_edge_qts()[:1] + [_random_qt(gen, (3, 30_001), 64, "nf4", True)]:
        _assert_matches_reference(qt)


def test_out_parameter_is_filled_and_returned(gen, make):
    qt = quantize(make("normal", (40, 96), torch.float32, gen), "nf4", 64, True)
    for dtype in DTYPES:
        out = torch.full((40, 96), 7.0, dtype=dtype)
        result = cpu_kernel.dequantize_cpu(qt, dtype, out=out)
        assert result is out
        assert torch.equal(_bits(out), _bits(_reference(qt, dtype)))
        via_api = torch.empty((40, 96), dtype=dtype)
        assert qt.dequantize(dtype, out=via_api) is via_api and torch.equal(via_api, out)


def test_bad_out_and_inconsistent_tensors_raise(gen, make):
    qt = quantize(make("normal", (8, 64), torch.float32, gen), "nf4", 64, False)
    with pytest.raises(QuantizationError):
        cpu_kernel.dequantize_cpu(qt, torch.float32, out=torch.empty(8, 63))
    with pytest.raises(QuantizationError):
        cpu_kernel.dequantize_cpu(qt, torch.float32, out=torch.empty(64, 8).t())
    with pytest.raises(QuantizationError):
        cpu_kernel.dequantize_cpu(qt, torch.int8)
    short = QuantizedTensor(qt.packed, qt.absmax[:-1], qt.shape, qt.dtype, 64, "nf4")
    with pytest.raises(QuantizationError):
        cpu_kernel.dequantize_cpu(short, torch.float32)
    truncated = QuantizedTensor(qt.packed[:-1], qt.absmax, qt.shape, qt.dtype, 64, "nf4")
    with pytest.raises(QuantizationError):
        cpu_kernel.dequantize_cpu(truncated, torch.float32)


def test_non_contiguous_inputs(gen, make):
    qt = quantize(make("normal", (32, 256), torch.float32, gen), "nf4", 64, True)
    strided = QuantizedTensor(
        qt.packed.repeat(1, 2)[:, :1], qt.absmax.repeat(2, 1).t()[:, 0], qt.shape, qt.dtype, 64, "nf4",
        qt.nested_absmax.repeat(2, 1).t()[:, 0], qt.nested_offset,
    )
    assert not strided.packed.is_contiguous() or not strided.absmax.is_contiguous()
    for dtype in DTYPES:
        assert torch.equal(cpu_kernel.dequantize_cpu(strided, dtype), cpu_kernel.dequantize_cpu(qt, dtype))


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
def test_thread_count_does_not_change_bytes(gen, threads, double_quant):
    qt = _random_qt(gen, (400_003,), 64, "nf4", double_quant)
    for dtype in DTYPES:
        torch.set_num_threads(1)
        single = cpu_kernel.dequantize_cpu(qt, dtype)
        torch.set_num_threads(2)
        double = cpu_kernel.dequantize_cpu(qt, dtype)
        torch.set_num_threads(3)  # more threads than cores still gives the same bytes
        triple = cpu_kernel.dequantize_cpu(qt, dtype)
        assert torch.equal(_bits(single), _bits(double)) and torch.equal(_bits(single), _bits(triple))


def test_flush_denormal_mode_reaches_every_thread(gen, threads):
    """torch.set_flush_denormal(True) sets the caller's FTZ/DAZ; worker threads must use it too."""
    qt = _random_qt(gen, (400_003,), 64, "nf4", False)
    qt.absmax.mul_(1e-30)  # most products subnormal in float32
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush denormals")
    try:
        results = []
        for count in (1, 2):
            torch.set_num_threads(count)
            results.append(cpu_kernel.dequantize_cpu(qt, torch.float32))
    finally:
        torch.set_flush_denormal(False)
    assert torch.equal(_bits(results[0]), _bits(results[1]))
    unflushed = cpu_kernel.dequantize_cpu(qt, torch.float32)
    assert torch.equal(_bits(unflushed), _bits(_reference(qt, torch.float32)))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
@pytest.mark.parametrize("shape", [(128, 192), (3, 64), (33, 4096)], ids=str)
def test_matches_bitsandbytes_on_bnb_bytes(bnb_oracle, gen, make, quant_type, double_quant, shape):
    """Decode bitsandbytes' own quantize_4bit output; widths are multiples of 64 (bnb CPU's safe case)."""
    weight = make("normal", shape, torch.bfloat16, gen)
    packed, state = bnb_oracle.quantize_4bit(weight, quant_type, 64, double_quant)
    nested = {}
    if double_quant:
        nested = dict(nested_absmax=state.state2.absmax, nested_offset=float(state.offset))
    qt = QuantizedTensor(packed, state.absmax, torch.Size(shape), torch.bfloat16, 64, quant_type, **nested)
    for dtype in DTYPES:
        state.dtype = dtype
        expected = bnb_oracle.dequantize_4bit(packed, state)
        assert torch.equal(cpu_kernel.dequantize_cpu(qt, dtype), expected), dtype


def test_fallback_when_kernels_disabled(gen, make, monkeypatch):
    qt = quantize(make("normal", (9, 130), torch.float32, gen), "fp4", 64, True)

    def forbidden(*args, **kwargs):
        raise AssertionError("the C kernel must not run with NIBBLETUNE_NO_KERNELS=1")

    monkeypatch.setenv("NIBBLETUNE_NO_KERNELS", "1")
    monkeypatch.setattr(cpu_kernel, "dequantize_cpu", forbidden)
    for dtype in DTYPES:
        assert torch.equal(_bits(dequantize_4bit(qt, dtype)), _bits(_reference(qt, dtype)))


def test_failed_build_falls_back_with_one_warning(gen, make, monkeypatch, tmp_path, caplog):
    qt = quantize(make("normal", (5, 70), torch.float32, gen), "nf4", 64, False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(cpu_kernel.KERNEL, "compiler", lambda: "/bin/false")
    fresh_kernel(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="nibbletune.native"):
        assert not cpu_kernel.cpu_kernel_available()
        assert not cpu_kernel.cpu_kernel_available()
        result = dequantize_4bit(qt, torch.bfloat16)
    assert len([r for r in caplog.records if "unavailable" in r.getMessage()]) == 1
    assert torch.equal(_bits(result), _bits(_reference(qt, torch.bfloat16)))
    assert not list(tmp_path.rglob("*.tmp")), "a failed build left a temporary file behind"


def test_build_goes_to_the_cache_atomically(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    fresh_kernel(monkeypatch)
    assert cpu_kernel.cpu_kernel_available()
    built = list((tmp_path / "nibbletune" / "kernels").glob("*/dequant4bit.so"))
    assert len(built) == 1
    assert [p.name for p in built[0].parent.iterdir()] == ["dequant4bit.so"]
