"""The Triton dequantize kernel against the slow reference, bit for bit.

Runs on the CPU through Triton's interpreter: the autouse fixture sets TRITON_INTERPRET=1 for
each test, and the kernel module wraps its kernel in `triton.jit` lazily (once per mode), so
the order in which modules were imported does not matter and the flag does not leak into
other test files. Tensors are small: the interpreter runs each program in numpy.
"""

import importlib.util
import math
import sys

import pytest
import torch

pytest.importorskip("triton")

from nibbletune.quant.dequantize import dequantize_torch  # noqa: E402
from nibbletune.quant.reference import reference_decompress_absmax, reference_dequantize_4bit  # noqa: E402
from nibbletune.quant.tensor import QuantizedTensor, quantize  # noqa: E402
from nibbletune.quant.triton_kernel import dequantize_triton, triton_available  # noqa: E402

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


@pytest.fixture(autouse=True)
def interpreter(request, monkeypatch):
    """Run every test but the GPU ones under Triton's CPU interpreter."""
    if request.node.get_closest_marker("gpu") is None:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


def expected(qt: QuantizedTensor, dtype: torch.dtype) -> torch.Tensor:
    """The reference decoding of `qt` (absmax recovered by the reference when double quantized)."""
    absmax = qt.absmax
    if qt.double_quant:
        absmax = reference_decompress_absmax(qt.absmax, qt.nested_absmax, qt.nested_offset)
    return reference_dequantize_4bit(qt.packed, absmax, qt.shape, dtype, qt.quant_type, qt.blocksize)


def assert_bit_equal(actual: torch.Tensor, wanted: torch.Tensor) -> None:
    """Same shape, dtype and bits (so -0.0 vs 0.0 or a rounding tie would show)."""
    assert actual.shape == wanted.shape and actual.dtype == wanted.dtype
    actual, wanted = actual.cpu(), wanted.cpu()
    same = actual.view(BITS[actual.dtype]) == wanted.view(BITS[wanted.dtype])
    if not bool(same.all()):
        bad = (~same).nonzero()[:5].tolist()
        pytest.fail(f"{int((~same).sum())} of {same.numel()} values differ, first at {bad}")


def weights(shape, seed: int) -> torch.Tensor:
    """Normal values with a per-element spread of scales, plus an all-zero stretch."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen) * torch.rand(shape, generator=gen).pow(3) * 4
    flat = x.view(-1)
    flat[flat.numel() // 3 : flat.numel() // 3 + 40] = 0
    return x


# (shape, blocksize, block_bytes): odd numel, 1-D, partial blocks and programs, widths that are
# not multiples of the blocksize, programs covering many blocks (ROWS > 1) or part of one, and
# more than 256 blocks so the nested index moves (last case).
CASES = [
    ((1,), 64, 1024),
    ((7,), 32, 16),
    ((5, 13), 32, 16),
    ((3, 100), 64, 64),
    ((2, 3, 40), 128, 64),
    ((4, 96), 256, 32),
    ((1000,), 512, 128),
    ((3, 700), 1024, 256),
    ((5000,), 2048, 1024),
    ((9, 1001), 4096, 1024),
    ((33, 257), 32, 1024),
]


@pytest.mark.parametrize("shape, blocksize, block_bytes", CASES, ids=lambda v: str(v))
@pytest.mark.parametrize(
    "quant_type, double_quant",
    [("nf4", True), ("fp4", False), ("nf4", False), ("fp4", True), ("int4", True), ("int4", False)],
)
def test_matches_reference(shape, blocksize, block_bytes, quant_type, double_quant):
    qt = quantize(weights(shape, seed=math.prod(shape) + blocksize), quant_type, blocksize, double_quant)
    for dtype in DTYPES:
        got = dequantize_triton(qt, dtype, block_bytes=block_bytes)
        assert_bit_equal(got, expected(qt, dtype))


def test_matches_torch_path_with_default_tiling():
    qt = quantize(weights((48, 130), seed=3), "nf4", 64, True)
    for dtype in DTYPES:
        assert_bit_equal(dequantize_triton(qt, dtype), dequantize_torch(qt, dtype))


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # numpy, fp16 inf
def test_rounding_ties_subnormals_and_overflow():
    """Hand-made scales whose products sit exactly on bf16/fp16 rounding ties, or under/overflow.

    The Triton interpreter's own float32 -> bfloat16 cast truncates; these catch it.
    """
    scales = [
        1 + 2**-8,  # bf16 tie, rounds down to even (1.0)
        1 + 3 * 2**-8,  # bf16 tie, rounds up to even (1 + 2**-6); truncation gives 1 + 2**-7
        1 + 3 * 2**-11,  # fp16 tie, rounds up to even
        1 + 2**-11,  # fp16 tie, rounds down
        (2 - 2**-8) * 2**127,  # bf16 rounds up into the next binade
        3.4028234663852886e38,  # float32 max: bf16 rounds to inf, fp16 overflows
        1e-6,  # fp16 subnormal results
        3e-8,  # fp16 values that round to zero or the smallest subnormal
        0.0,  # all-zero block
    ]
    blocksize = 32
    absmax = torch.tensor(scales, dtype=torch.float32)
    n = blocksize * len(scales) - 5  # odd, partial last block
    codes = torch.arange(n) % 16  # every code in every block
    codes = torch.cat([codes, torch.zeros(1, dtype=torch.long)])  # pad to an even count
    packed = (codes[0::2] * 16 + codes[1::2]).to(torch.uint8).unsqueeze(1)
    for quant_type in ("nf4", "fp4", "int4"):
        qt = QuantizedTensor(packed, absmax, torch.Size([n]), torch.float32, blocksize, quant_type)
        for dtype in DTYPES:
            assert_bit_equal(dequantize_triton(qt, dtype, block_bytes=64), expected(qt, dtype))


def test_double_quant_recovery_is_mul_then_add():
    """Offsets chosen so that a fused multiply-add would round differently from mul, then add."""
    gen = torch.Generator().manual_seed(11)
    blocks, blocksize = 600, 32
    codes = torch.randint(0, 256, (blocks,), generator=gen, dtype=torch.uint8)
    nested = torch.rand(3, generator=gen) * 0.37 + 0.01
    packed = torch.randint(0, 256, (blocks * blocksize // 2, 1), generator=gen, dtype=torch.uint8)
    shape = torch.Size([blocks * blocksize])
    for offset in (0.1234567, 1.0000001, 3.3333333):
        offset32 = float(torch.tensor(offset, dtype=torch.float32))
        qt = QuantizedTensor(packed, codes, shape, torch.float32, blocksize, "nf4", nested, offset32)
        assert_bit_equal(dequantize_triton(qt, torch.float32), expected(qt, torch.float32))


def test_out_argument():
    qt = quantize(weights((6, 50), seed=5), "nf4", 64, True)
    for dtype in DTYPES:
        out = torch.full(qt.shape, 7.0, dtype=dtype)
        result = dequantize_triton(qt, dtype, out=out, block_bytes=64)
        assert result is out
        assert_bit_equal(out, expected(qt, dtype))
    with pytest.raises(ValueError, match="out must be"):
        dequantize_triton(qt, torch.float16, out=torch.empty(qt.shape, dtype=torch.float32))
    with pytest.raises(ValueError, match="out must be"):
        dequantize_triton(qt, torch.float32, out=torch.empty(6, 60))


def test_bad_arguments():
    qt = quantize(weights((64,), seed=1), "nf4", 64, False)
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        dequantize_triton(qt, torch.int8)
    with pytest.raises(ValueError, match="power of two"):
        dequantize_triton(qt, torch.float32, block_bytes=48)


def test_available_under_interpreter(monkeypatch):
    assert triton_available()
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        assert not triton_available()
        with pytest.raises(RuntimeError, match="Triton"):
            dequantize_triton(quantize(torch.ones(64)), torch.float32)


def test_import_without_triton(monkeypatch):
    """A fresh copy of the module imports, and says it is unavailable, when triton cannot."""
    import nibbletune.quant.triton_kernel as installed

    monkeypatch.setitem(sys.modules, "triton", None)  # makes `import triton` raise ImportError
    monkeypatch.setitem(sys.modules, "triton.language", None)
    name = "nibbletune.quant._triton_kernel_without_triton"
    spec = importlib.util.spec_from_file_location(name, installed.__file__)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.triton is None
    assert not module.triton_available()
    with pytest.raises(RuntimeError, match="Triton"):
        module.dequantize_triton(quantize(torch.ones(64)), torch.float32)


@pytest.mark.gpu
def test_cuda_kernel_matches_reference(monkeypatch):
    """The compiled kernel on a real GPU: bit-exact, including the no-FMA absmax recovery."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    for shape, blocksize, quant_type, double_quant in [
        ((4096, 1000), 64, "nf4", True),
        ((777, 333), 32, "fp4", True),
        ((257, 4097), 4096, "nf4", False),
        ((12345,), 128, "fp4", False),
    ]:
        qt = quantize(weights(shape, seed=blocksize), quant_type, blocksize, double_quant).to("cuda")
        for dtype in DTYPES:
            for block_bytes in (256, 1024, 4096):
                got = dequantize_triton(qt, dtype, block_bytes=block_bytes)
                assert_bit_equal(got, expected(qt.to("cpu"), dtype))
