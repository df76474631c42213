"""Shared test fixtures: seeded generators, the compute-dtype regimes, the bitsandbytes oracle.

The `bnb` fixture skips a test cleanly when bitsandbytes is not installed. `bnb_oracle` wraps
the few bitsandbytes calls the differential tests need, including the exact-nearest
blockwise quantizer of bitsandbytes' *default* (pure-PyTorch) backend, which the CPU
backend would otherwise replace with its lookup-table kernel.

Compute regimes: `compute_dtype: auto` is bf16 on CPUs with native bf16 (avx512_bf16 / AMX) and
float32 elsewhere, so the suite runs in a different regime depending on the machine. Tests that
depend on the regime take the `compute_dtype` fixture, which runs them in both, on tiny shapes,
on every machine; `NIBBLETUNE_AUTO_COMPUTE_DTYPE=float32|bfloat16 pytest` runs everything else as
the other kind of machine would. The header says which machine and which regime this run is.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch

# Tests never reach the network: a Hub id that is not cached fails at once instead of downloading.
os.environ["HF_HUB_OFFLINE"] = "1"

COMPUTE_DTYPES = ("float32", "bfloat16")


def pytest_report_header(config) -> list[str]:
    """The CPU kind and the compute dtype `auto` means in this run."""
    from nibbletune.devices import AUTO_OVERRIDE_ENV, cpu_has_native_bf16, resolve_compute_dtype, simd_summary

    kind = "native bf16 (avx512_bf16/AMX)" if cpu_has_native_bf16() else "no native bf16 (AVX2 class)"
    auto = str(resolve_compute_dtype("auto")).removeprefix("torch.")
    override = os.environ.get(AUTO_OVERRIDE_ENV)
    source = f"forced by {AUTO_OVERRIDE_ENV}" if override else "from the CPU flags"
    return [f"nibbletune: CPU {kind}; flags: {simd_summary()}; torch threads {torch.get_num_threads()}",
            f"nibbletune: compute_dtype auto = {auto} ({source}); regime-dependent tests run in "
            f"{' and '.join(COMPUTE_DTYPES)}"]


@pytest.fixture(params=COMPUTE_DTYPES)
def compute_dtype(request) -> str:
    """Each compute regime in turn ("float32", "bfloat16"), whatever this machine's `auto` is."""
    return request.param

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
KINDS = (
    "normal", "student_t", "cauchy", "constant", "zero_blocks", "huge", "near_max", "tiny", "subnormal",
    "mixed_rows", "ties",
)
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
QUANT_TYPES = ("nf4", "fp4")


@pytest.fixture
def gen() -> torch.Generator:
    """A CPU generator with a fixed seed, fresh for every test."""
    return torch.Generator().manual_seed(1234)


@pytest.fixture(scope="module")
def single_thread():
    """Run a module's tests with one intra-op thread, restoring the count afterwards.

    The engine's results do not depend on the thread count (test_reference checks it), but the
    differential suites run thousands of small ops, where a contended thread pool costs more
    than it saves. Use with `pytestmark = pytest.mark.usefixtures("single_thread")`.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def bnb():
    """The bitsandbytes module; skips the test when it is not installed."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pytest.importorskip("bitsandbytes")


class BnbOracle:
    """bitsandbytes as a reference implementation of the 4-bit format (CPU)."""

    def __init__(self, bnb_module):
        self.bnb = bnb_module
        self.F = bnb_module.functional

    def quantize_4bit(self, tensor: torch.Tensor, quant_type: str, blocksize: int, double_quant: bool):
        """Return (packed, QuantState) from bitsandbytes.functional.quantize_4bit."""
        return self.F.quantize_4bit(
            tensor, blocksize=blocksize, quant_type=quant_type, compress_statistics=double_quant
        )

    def dequantize_4bit(self, packed: torch.Tensor, state) -> torch.Tensor:
        return self.F.dequantize_4bit(packed, state)

    def dynamic_map(self) -> torch.Tensor:
        return self.F.create_dynamic_map(signed=True)

    def quantize_blockwise_exact(self, values: torch.Tensor, blocksize: int = 256):
        """bitsandbytes' default-backend quantize_blockwise (exact nearest, float32 midpoints).

        The op's CPU kernel (a 65,536-entry lookup table) is registered for the CPU dispatch
        key; the default backend is registered as CompositeExplicitAutograd, so we redispatch
        straight to it.
        """
        op = torch.ops.bitsandbytes.quantize_blockwise.default
        keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
        return op.redispatch(keys, values, self.dynamic_map(), blocksize)

    def dequantize_blockwise(self, codes: torch.Tensor, state) -> torch.Tensor:
        return self.F.dequantize_blockwise(codes, state)

    def mismatches(
        self,
        tensor: torch.Tensor,
        quant_type: str,
        blocksize: int,
        double_quant: bool = False,
        compare_dequant: bool = True,
    ) -> list[str]:
        """Quantize `tensor` with nibbletune and bitsandbytes; return what differs (empty: all equal).

        Checks: packed bytes; float32 absmax; dequantized values where bitsandbytes' CPU
        dequantize is exact (the last dimension a multiple of the blocksize, and `compare_dequant`),
        except outputs below the dtype's smallest normal number: on AVX512-BF16 CPUs bitsandbytes
        converts to bf16 with vcvtneps2bf16, which flushes subnormals to zero, so those are checked
        against the exact reference (`quant/reference.py`, torch's round-to-nearest-even) instead;
        with double quantization the offset, nested absmax and codes against the exact-nearest
        default backend.
        """
        from nibbletune.quant import quantize
        from nibbletune.quant.reference import reference_dequantize_4bit

        problems = []
        ours = quantize(tensor, quant_type, blocksize, double_quant=double_quant)
        packed, state = self.quantize_4bit(tensor, quant_type, blocksize, double_quant=False)
        if ours.packed.shape != packed.shape or not torch.equal(ours.packed, packed):
            differing = (ours.packed != packed).sum().item() if ours.packed.shape == packed.shape else "shape"
            problems.append(f"packed bytes differ ({differing})")
        absmax = state.absmax
        if not double_quant and not torch.equal(ours.absmax, absmax):
            problems.append("absmax differs")
        if not double_quant and compare_dequant and tensor.shape[-1] % blocksize == 0:
            # bitsandbytes CPU returns shape (1, n) for a 1-D input: compare flat values.
            expected = self.dequantize_4bit(packed, state).reshape(-1)
            got = ours.dequantize().reshape(-1)
            reference = reference_dequantize_4bit(ours.packed, ours.absmax, ours.shape, ours.dtype, quant_type,
                                                  blocksize).reshape(-1)
            normal = reference.float().abs() >= torch.finfo(tensor.dtype).tiny
            if not torch.equal(got[normal], expected[normal]):
                problems.append("dequantized values differ")
            if not torch.equal(got[~normal], reference[~normal]):
                problems.append("subnormal dequantized values differ from the reference")
        if double_quant:
            offset = absmax.mean()
            if ours.nested_offset != offset.item():
                problems.append("nested offset differs")
            codes, nested_absmax = self.quantize_blockwise_exact(absmax - offset)
            if not torch.equal(ours.absmax, codes):
                problems.append(f"absmax codes differ ({(ours.absmax != codes).sum().item()})")
            if not torch.equal(ours.nested_absmax, nested_absmax):
                problems.append("nested absmax differs")
        return problems


@pytest.fixture(scope="session")
def bnb_oracle(bnb) -> BnbOracle:
    """bitsandbytes wrapped as an oracle; skips the test when it is not installed."""
    return BnbOracle(bnb)


def make_tensor(kind: str, shape, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """A test tensor of a named distribution; always finite in `dtype`.

    kinds: normal, student_t, cauchy, constant, zero_blocks, huge, near_max, tiny, subnormal,
    mixed_rows, ties.
    """
    shape = tuple(shape)
    n = 1
    for size in shape:
        n *= size
    if kind == "normal":
        x = torch.randn(shape, generator=gen)
    elif kind == "student_t":
        # t with 2 degrees of freedom: normal / sqrt(chi2_2 / 2), chi2_2 = -2 log U.
        u = torch.rand(shape, generator=gen).clamp(min=1e-12)
        x = torch.randn(shape, generator=gen) / torch.sqrt(-torch.log(u))
    elif kind == "cauchy":
        x = torch.empty(shape).cauchy_(generator=gen).clamp(-6e4, 6e4)
    elif kind == "constant":
        x = torch.full(shape, 0.3)
        x.view(-1)[::7] = -0.3
    elif kind == "zero_blocks":
        x = torch.randn(shape, generator=gen)
        x.view(-1)[: n // 2] = 0.0
    elif kind == "huge":
        x = torch.randn(shape, generator=gen) * (1e30 if dtype != torch.float16 else 1e4)
    elif kind == "near_max":
        x = (torch.rand(shape, generator=gen) * 1.8 - 0.9) * torch.finfo(dtype).max
    elif kind == "tiny":
        x = torch.randn(shape, generator=gen) * (1e-30 if dtype != torch.float16 else 1e-3)
    elif kind == "subnormal":
        # Below the smallest normal number of the dtype (float32/bfloat16: 1.2e-38, float16: 6.1e-5).
        x = torch.randn(shape, generator=gen) * (1e-39 if dtype != torch.float16 else 1e-6)
    elif kind == "mixed_rows":
        rows = shape[0] if len(shape) > 1 else 1
        scale = torch.logspace(-12, 12, rows).reshape(rows, *([1] * (len(shape) - 1)))
        x = torch.randn(shape, generator=gen) * (scale if len(shape) > 1 else 1.0)
        if dtype == torch.float16:
            x = x.clamp(-6e4, 6e4)
    elif kind == "ties":
        # Values exactly on the float32 midpoints of both codebooks, in blocks whose absmax is 1,
        # so the scaled value is the midpoint itself: only the tie rule decides the code.
        from nibbletune.quant.codebooks import quantize_bounds

        mids = torch.cat([quantize_bounds("nf4")[0], quantize_bounds("fp4")[0]])
        x = mids[torch.randint(0, mids.numel(), shape, generator=gen)]
        x.view(-1)[::32] = 1.0
    else:
        raise ValueError(kind)
    x = x.to(dtype)
    return torch.where(torch.isfinite(x), x, torch.zeros_like(x))


@pytest.fixture
def make():
    """make(kind, shape, dtype, gen) -> tensor; see make_tensor."""
    return make_tensor
