"""The compiled CPU dequantization kernel: C source built on first use, loaded with ctypes.

Why plain C and ctypes: the kernel (`csrc/dequant4bit.c`) includes no torch headers, so it
compiles in about a second with the system compiler and needs no build step at install
time. The algorithm and the derivation of its exactness are in the C file's header; in
short, every element is codebook[code] * scale in float32 (one multiply, like
`reference.py`), the per-block scale of double quantization is recovered in the kernel as
map[code] * nested_absmax + offset (two float32 operations), and the casts to float16 and
bfloat16 round to nearest even exactly as torch does. The flags include -ffp-contract=off so
the compiler can never fuse a multiply and an add, which would change bits.

Build cache: `nibbletune.native` compiles the source once per machine and compiler and
caches the shared library (see its docstring).

Fresh outputs of 4 MB or more are madvise(MADV_HUGEPAGE)d before the kernel writes them:
faulting in a new output page by page otherwise costs several times the decoding itself.

Threads: the C side runs torch.get_num_threads() OpenMP threads (libgomp; torch's wheel ships
the same soname, so one runtime serves both).

If no compiler exists or compiling fails, `cpu_kernel_available()` is False, one warning is
logged, and `dequantize.py` uses the pure-torch path. Importing this module never compiles.
"""

from __future__ import annotations

import ctypes
from functools import cache, lru_cache
from pathlib import Path

import torch

from ..errors import QuantizationError
from ..native import LazyLibrary
from .codebooks import NESTED_BLOCKSIZE, codebook, dynamic_map
from .outputs import check_output

SOURCE = Path(__file__).parent / "csrc" / "dequant4bit.c"
CFLAGS = ("-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-ffp-contract=off")
# Fresh outputs at least this large get madvise(MADV_HUGEPAGE) before the kernel first touches
# them: on Linux with transparent huge pages in "madvise" mode this makes a fresh 32 MB output
# about 3x cheaper to fault in (measured: 24.5 ms -> 7.1 ms single-threaded, 4096x4096 bf16).
HUGEPAGE_MIN_BYTES = 4 << 20
_OUT_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def _configure(library: ctypes.CDLL) -> None:
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    library.nt_dequant4bit.argtypes = [
        p, i64, i64, p, p, p, p, p, i64, ctypes.c_float, ctypes.c_int, p, ctypes.c_int
    ]
    library.nt_dequant4bit.restype = ctypes.c_int
    library.nt_dequant4bit_simd_level.restype = ctypes.c_int
    library.nt_advise_hugepages.argtypes = [p, i64]
    library.nt_advise_hugepages.restype = ctypes.c_int


KERNEL = LazyLibrary(SOURCE, CFLAGS, _configure, "CPU dequantization kernel")
_get_library = KERNEL.get


def cpu_kernel_available() -> bool:
    """True when the compiled C dequantization kernel can be used (compiles it on first call)."""
    return _get_library() is not None


def simd_level() -> str:
    """Which code path the compiled kernel uses: "avx2", "scalar", or "unavailable"."""
    library = _get_library()
    if library is None:
        return "unavailable"
    return "avx2" if library.nt_dequant4bit_simd_level() >= 2 else "scalar"


@cache
def _codebook(quant_type: str) -> torch.Tensor:
    return codebook(quant_type).contiguous()


def _flat(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`tensor` as contiguous `dtype` memory (no copy when it already is)."""
    if tensor.dtype == dtype and tensor.is_contiguous():
        return tensor
    return tensor.reshape(-1).to(dtype).contiguous()


def _check_inputs(qt, dtype: torch.dtype, out: torch.Tensor | None) -> None:
    check_output(qt, dtype, out)
    if not qt.packed.is_cpu:
        raise QuantizationError(f"the CPU kernel needs CPU tensors, got {qt.packed.device}")
    n, blocks = qt.numel, qt.num_blocks
    if qt.packed.dtype != torch.uint8 or qt.packed.numel() < (n + 1) // 2:
        raise QuantizationError(
            f"packed codes must be uint8 with at least {(n + 1) // 2} bytes, "
            f"got {qt.packed.dtype} with {qt.packed.numel()}"
        )
    if qt.absmax.numel() < blocks:
        raise QuantizationError(f"absmax has {qt.absmax.numel()} entries, expected {blocks}")
    if qt.double_quant and qt.nested_absmax.numel() < -(-blocks // NESTED_BLOCKSIZE):
        raise QuantizationError(
            f"nested_absmax has {qt.nested_absmax.numel()} entries, expected {-(-blocks // NESTED_BLOCKSIZE)}"
        )


def dequantize_cpu(qt, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """Decode a CPU QuantizedTensor to `dtype` with the C kernel, into `out` when given.

    Bit-exact with `reference.reference_dequantize_4bit`; uses torch.get_num_threads() threads.
    Raises QuantizationError for bad dtypes, devices or inconsistent tensors, RuntimeError if
    the kernel is not available (check `cpu_kernel_available()` first).
    """
    _check_inputs(qt, dtype, out)
    library = _get_library()
    if library is None:
        raise RuntimeError("the nibbletune CPU kernel is not available (see the logged warning)")
    n = qt.numel
    result = out
    if result is None:
        result = torch.empty(qt.shape, dtype=dtype)
        if n * result.element_size() >= HUGEPAGE_MIN_BYTES:
            library.nt_advise_hugepages(result.data_ptr(), n * result.element_size())
    if n == 0:
        return result
    packed = _flat(qt.packed, torch.uint8)
    table = _codebook(qt.quant_type)
    if qt.double_quant:
        absmax = None
        absmax_codes = _flat(qt.absmax, torch.uint8)
        nested_absmax = _flat(qt.nested_absmax, torch.float32)
        nested_map = _nested_map()
        offset = float(qt.nested_offset)
    else:
        absmax = _flat(qt.absmax, torch.float32)
        absmax_codes = nested_absmax = nested_map = None
        offset = 0.0

    def pointer(tensor: torch.Tensor | None) -> int | None:
        return None if tensor is None else tensor.data_ptr()

    status = library.nt_dequant4bit(
        packed.data_ptr(), n, qt.blocksize, table.data_ptr(), pointer(absmax), pointer(absmax_codes),
        pointer(nested_map), pointer(nested_absmax), NESTED_BLOCKSIZE, offset, _OUT_CODES[dtype],
        result.data_ptr(), torch.get_num_threads(),
    )
    if status != 0:
        raise QuantizationError(f"the CPU kernel rejected {qt!r} (status {status})")
    return result


@lru_cache(maxsize=1)
def _nested_map() -> torch.Tensor:
    return dynamic_map().contiguous()
