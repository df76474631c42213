"""Triton dequantization kernel: packed 4-bit codes (+ double-quantized absmax) -> float tensor.

One kernel fuses every step of `reference.reference_dequantize_4bit` (after
`reference_decompress_absmax` when double quantized) and agrees with it bit for bit:

    byte    = packed[i]                         element 2i = high nibble, 2i + 1 = low nibble
    absmax  = map[code[b]] * nested[b // 256]   float32 product, rounded ...
            + offset                            ... then a separate float32 add (never an FMA)
    value   = codebook[nibble] * absmax[b]      float32, b = element // blocksize
    out     = round_to_nearest_even(value)      float32 / float16 / bfloat16

Design (per program = one contiguous run of BLOCK packed bytes -> 2 * BLOCK outputs):

* The run is viewed as a 2-D tile [ROWS, COLS] of bytes with COLS = min(BLOCK, blocksize / 2),
  so each row lies inside one absmax block. Blocksizes (32..4096) and BLOCK are powers of two,
  so a program either covers whole blocks (ROWS = 2 * BLOCK / blocksize) or sits inside one
  (ROWS = 1): the block of row r is simply `first_block + r`. The scale work (absmax load, or
  code -> map gather, nested load, multiply, add) is done once per row, not per element, and
  broadcast along the row. Blocks run across tensor rows in flat order; the tensor's shape
  never enters the kernel.
* Bytes are loaded as contiguous rows (`evict_first`: streamed); a warp reads whole 128-byte
  lines. The default tile (`default_block_bytes`: 1024 bytes for bf16/fp16, 512 for float32,
  8 warps) gives every thread exactly one 16-byte output store and no layout conversion.
  The 16-entry codebook is gathered through a pointer (`evict_last`, it stays in L1): one load
  instruction per element, fewer issue slots than a 15-select `tl.where` tree, and the same
  kernel serves NF4, FP4 or any other 16-entry codebook.
* `join` + `reshape` (= `tl.interleave(high, low)`) turn the two [ROWS, COLS] value tiles into
  [ROWS, 2 * COLS] in memory order: each thread stores its contiguous outputs as one vector.
* Program offsets are int64 (scalar pointer bases); per-element offsets stay int32. Any numel
  works: odd (the last byte's low nibble is masked off), partial last block, partial program.
* No FMA: Triton's CUDA backend fuses `a * b + c` by default (`enable_fp_fusion=True`): the
  sm_90 PTX of this kernel then has `fma.rn.f32` for the absmax recovery. It is launched with
  `enable_fp_fusion=False`, which emits `mul.rn.f32` + `add.rn.f32` (explicit rounding, so
  ptxas may not contract them either). The other float ops are products followed by casts.
* bfloat16 rounding is done in integer arithmetic (add 0x7FFF + lsb, shift): the Triton
  interpreter truncates float32 -> bfloat16 instead of rounding to nearest even, so this keeps
  one code path that is exact both on the GPU and under TRITON_INTERPRET=1, at a few integer
  ops per element. Inputs are finite (quantize rejects NaN/inf), so no NaN special case.
  float16 uses the hardware conversion (round to nearest even, subnormals kept, in both).

Performance target: memory bound, >= 85% of HBM bandwidth on H100 (bf16 output: 2.5 bytes per
parameter moved; about 8 instructions per element in the PTX, well under the ~25 an H100 can
issue per element at full bandwidth). Not yet measured on a GPU: `benchmarks/dequant_gpu.py`
measures it against bitsandbytes (`--sweep` tries other tiles).

Triton is optional: without it (or without CUDA and TRITON_INTERPRET=1) `triton_available()`
is False. The kernel is wrapped by `triton.jit` lazily, on first use, once per interpreter
mode, so setting TRITON_INTERPRET after this module was imported still takes effect.
"""

import os
import struct
from functools import lru_cache

import torch

from .codebooks import NESTED_BLOCKSIZE, codebook, dynamic_map
from .outputs import check_output

try:  # Triton is optional; a broken install must not break `import nibbletune`.
    import triton
    import triton.language as tl
except Exception:  # noqa: BLE001
    triton = None
    tl = None

DEFAULT_NUM_WARPS = 8


def _interpret_requested() -> bool:
    """True when TRITON_INTERPRET asks Triton to run kernels on the CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def triton_available() -> bool:
    """True when Triton imports and can run the kernel (CUDA present, or TRITON_INTERPRET=1)."""
    if triton is None:
        return False
    return _interpret_requested() or torch.cuda.is_available()


if triton is not None:

    def _dequantize_4bit_body(
        packed_ptr,  # uint8 [nbytes]
        absmax_ptr,  # float32 [blocks], or uint8 codes [blocks] when DOUBLE_QUANT
        nested_ptr,  # float32 [ceil(blocks / NESTED)] (DOUBLE_QUANT only)
        map_ptr,  # float32 [256] dynamic map (DOUBLE_QUANT only)
        codebook_ptr,  # float32 [16]
        out_ptr,  # float32 / float16 / bfloat16 [n]
        offset,  # float32 scalar (DOUBLE_QUANT only)
        n,  # number of output elements
        nbytes,  # number of packed bytes = (n + 1) // 2
        BLOCKSIZE: tl.constexpr,
        NESTED: tl.constexpr,
        ROWS: tl.constexpr,
        COLS: tl.constexpr,
        DOUBLE_QUANT: tl.constexpr,
        OUT_BF16: tl.constexpr,
    ):
        pid = tl.program_id(0).to(tl.int64)
        byte_start = pid * (ROWS * COLS)
        elem_start = byte_start * 2
        bytes_left = nbytes - byte_start
        elems_left = n - elem_start

        rows = tl.arange(0, ROWS)
        cols = tl.arange(0, COLS)
        byte_local = rows[:, None] * COLS + cols[None, :]  # [ROWS, COLS]
        packed = tl.load(
            packed_ptr + byte_start + byte_local,
            mask=byte_local < bytes_left,
            other=0,
            eviction_policy="evict_first",
        )

        # One absmax per row: the row's 2 * COLS elements lie inside block first_block + r.
        block = elem_start // BLOCKSIZE + rows  # [ROWS] int64
        row_ok = rows * COLS < bytes_left
        if DOUBLE_QUANT:
            absmax_code = tl.load(absmax_ptr + block, mask=row_ok, other=0)
            mapped = tl.load(map_ptr + absmax_code.to(tl.int32), eviction_policy="evict_last")
            nested = tl.load(nested_ptr + block // NESTED, mask=row_ok, other=0.0)
            scaled = mapped * nested  # rounded to float32 here ...
            absmax = scaled + offset  # ... then added: launched with enable_fp_fusion=False
        else:
            absmax = tl.load(absmax_ptr + block, mask=row_ok, other=0.0)

        high = tl.load(codebook_ptr + (packed >> 4).to(tl.int32), eviction_policy="evict_last")
        low = tl.load(codebook_ptr + (packed & 15).to(tl.int32), eviction_policy="evict_last")
        # Interleave high/low: [ROWS, COLS, 2] -> [ROWS, 2 * COLS] in memory order. Spelled with the
        # builtins join + reshape (what tl.interleave does) because tl.interleave is itself a
        # @triton.jit function, compiled for the GPU if triton was imported before the
        # interpreter flag was set, which the interpreter then refuses to call.
        values = tl.reshape(tl.join(high * absmax[:, None], low * absmax[:, None]), (ROWS, 2 * COLS))

        if OUT_BF16:
            # float32 -> bfloat16, round to nearest even, in integers (see module docstring).
            bits = values.to(tl.uint32, bitcast=True)
            bits = bits + (0x7FFF + ((bits >> 16) & 1))
            result = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        else:
            result = values.to(out_ptr.dtype.element_ty)

        elem_local = rows[:, None] * (2 * COLS) + tl.arange(0, 2 * COLS)[None, :]
        tl.store(out_ptr + elem_start + elem_local, result, mask=elem_local < elems_left)


@lru_cache(maxsize=2)
def _kernel(interpret: bool):
    """`triton.jit` of the kernel body; `interpret` is only the cache key (jit reads the env)."""
    return triton.jit(_dequantize_4bit_body)


@lru_cache(maxsize=16)
def _tables(quant_type: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(codebook[16], dynamic map[256]) on `device`, copied there once, not per call."""
    return codebook(quant_type, device), dynamic_map(device)


def _float32_value(value: float) -> float:
    """`value` rounded to float32 (so passing it as a Triton fp32 scalar is exact)."""
    return struct.unpack("f", struct.pack("f", value))[0]


def _tile(block_bytes: int, blocksize: int) -> tuple[int, int]:
    """(ROWS, COLS) of a program's byte tile; each row lies inside one absmax block."""
    cols = min(block_bytes, blocksize // 2)
    return block_bytes // cols, cols


def default_block_bytes(dtype: torch.dtype, num_warps: int = DEFAULT_NUM_WARPS) -> int:
    """Packed bytes per program so that each thread stores exactly 16 bytes of output.

    A thread then holds 16 / (2 * itemsize) packed bytes (4 for bf16/fp16, 2 for float32): with
    that tile Triton's load, join/reshape and 16-byte store layouts coincide (checked in the
    generated TTGIR/PTX for sm_90); larger tiles add a layout conversion through shared memory.
    """
    itemsize = torch.empty(0, dtype=dtype).element_size()
    return 32 * num_warps * 8 // itemsize


def dequantize_triton(
    qt,
    dtype: torch.dtype,
    out: torch.Tensor | None = None,
    *,
    block_bytes: int | None = None,
    num_warps: int = DEFAULT_NUM_WARPS,
) -> torch.Tensor:
    """Decode a QuantizedTensor to `dtype` with the Triton kernel, into `out` when given.

    `qt` must be on CUDA (or on any device under TRITON_INTERPRET=1). `block_bytes` (a power of
    two) is the number of packed bytes per program, by default `default_block_bytes(dtype,
    num_warps)`; `num_warps` the warps per program. Tune with benchmarks/dequant_gpu.py --sweep.
    The result equals `reference.reference_dequantize_4bit` bit for bit.
    """
    if block_bytes is None:
        block_bytes = default_block_bytes(dtype, num_warps)
    if not triton_available():
        raise RuntimeError("the Triton dequantize kernel needs triton and CUDA (or TRITON_INTERPRET=1)")
    check_output(qt, dtype, out)
    if block_bytes < 1 or block_bytes & (block_bytes - 1):
        raise ValueError(f"block_bytes must be a power of two, got {block_bytes}")
    interpret = _interpret_requested()
    if qt.device.type != "cuda" and not interpret:
        raise ValueError(f"the Triton kernel runs on CUDA tensors, got one on {qt.device}")
    if out is None:
        out = torch.empty(qt.shape, dtype=dtype, device=qt.device)
    n = qt.numel
    if n == 0:
        return out

    packed = qt.packed.reshape(-1)
    codebook_values, map_values = _tables(qt.quant_type, qt.device)
    if qt.double_quant:
        nested, offset = qt.nested_absmax, _float32_value(qt.nested_offset)
    else:
        nested, offset = qt.absmax, 0.0  # unused placeholders for the disabled branch
    rows, cols = _tile(block_bytes, qt.blocksize)
    nbytes = (n + 1) // 2
    grid = (triton.cdiv(nbytes, block_bytes),)
    _kernel(interpret)[grid](
        packed,
        qt.absmax,
        nested,
        map_values,
        codebook_values,
        out,
        offset,
        n,
        nbytes,
        BLOCKSIZE=qt.blocksize,
        NESTED=NESTED_BLOCKSIZE,
        ROWS=rows,
        COLS=cols,
        DOUBLE_QUANT=qt.double_quant,
        OUT_BF16=dtype == torch.bfloat16,
        num_warps=num_warps,
        enable_fp_fusion=False,
    )
    return out
