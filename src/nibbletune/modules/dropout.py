"""Hashed dropout: a dropout mask computed from (seed, element index) instead of drawn from a stream.

torch's CPU dropout draws every element from one Mersenne-Twister stream on one thread: about
10 ms for a 1024 x 1408 activation on the machines here, which made LoRA dropout the largest
single cost of a CPU QLoRA step (measured with torch.profiler: `aten::bernoulli_` 125 ms of a
767 ms step). A counter-based mask costs a few integer operations per element, vectorizes and
splits across threads, and the backward pass can recompute it from the seed instead of
keeping it.

Definition (shared by the C kernel `csrc/dropout_mask.c` and `dropout_mask_reference`, which
agree bit for bit): for element i of the flattened tensor, with j = i // 2,

    h = mix32(mix32((j mod 2^32) xor seed_lo) + seed_hi)        (uint32 arithmetic)
    bits(i) = h & 0xffff if i is even else h >> 16
    keep(i) = bits(i) >= threshold,  threshold = round(p * 65536)

and the mask value is 1 / (1 - threshold / 65536) where kept, 0 where dropped, so
E[mask] = 1 exactly. The drop probability is therefore p rounded to a multiple of 1/65536
(0.05 becomes 0.0500031). Each call draws its 64-bit seed from torch's default CPU generator,
so runs are reproducible under `torch.manual_seed` and resume exactly when the generator
state is restored.
"""

from __future__ import annotations

import ctypes
import math
from pathlib import Path

import torch

from ..native import LazyLibrary, kernels_enabled

SOURCE = Path(__file__).parent / "csrc" / "dropout_mask.c"
CFLAGS = ("-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-ffp-contract=off")
MASK_RESOLUTION = 1 << 16
_MAX_ELEMENTS = 1 << 33  # pairs are indexed mod 2^32
_UINT32 = 0xFFFFFFFF


def _configure(library: ctypes.CDLL) -> None:
    library.nt_dropout_mask.argtypes = [
        ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_uint32, ctypes.c_int,
    ]
    library.nt_dropout_mask.restype = ctypes.c_int
    library.nt_dropout_apply_f32.argtypes = [
        ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_float,
        ctypes.c_int, ctypes.c_int,
    ]
    library.nt_dropout_apply_f32.restype = ctypes.c_int


KERNEL = LazyLibrary(SOURCE, CFLAGS, _configure, "dropout kernel")
_get_library = KERNEL.get


def dropout_threshold(p: float) -> int:
    """The 16-bit threshold below which an element is dropped: round(p * 65536)."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    return min(round(p * MASK_RESOLUTION), MASK_RESOLUTION - 1)


def keep_scale(p: float) -> float:
    """1 / (1 - effective p): the value of a kept element of the mask."""
    return MASK_RESOLUTION / (MASK_RESOLUTION - dropout_threshold(p))


def draw_seed() -> int:
    """A 64-bit mask seed drawn from torch's default CPU generator."""
    return int(torch.randint(-(1 << 63), (1 << 63) - 1, (), dtype=torch.int64)) & ((1 << 64) - 1)


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 on int64 tensors holding uint32 values (products wrap; only the low 32 bits are kept)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _UINT32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _UINT32
    return x ^ (x >> 16)


def dropout_mask_reference(shape, p: float, seed: int, dtype: torch.dtype, device=None) -> torch.Tensor:
    """The mask in pure torch (any device): values 1 / (1 - p') where kept, 0 where dropped."""
    numel = math.prod(int(size) for size in shape)
    pair_index = torch.arange((numel + 1) // 2, dtype=torch.int64, device=device) & _UINT32
    seed_lo, seed_hi = seed & _UINT32, (seed >> 32) & _UINT32
    h = _mix32((_mix32(pair_index ^ seed_lo) + seed_hi) & _UINT32)
    bits = torch.stack([h & 0xFFFF, h >> 16], dim=1).reshape(-1)[:numel]
    scale = torch.tensor(keep_scale(p), dtype=dtype, device=device)
    return torch.where(bits >= dropout_threshold(p), scale, torch.zeros((), dtype=dtype, device=device)).reshape(shape)


def dropout_mask(shape, p: float, seed: int, dtype: torch.dtype, device=None) -> torch.Tensor:
    """The dropout mask of `shape` for `seed`: the C kernel on CPU, `dropout_mask_reference` elsewhere."""
    device = torch.device(device or "cpu")
    numel = math.prod(int(size) for size in shape)
    element_size = dtype.itemsize
    library = _get_library() if device.type == "cpu" and kernels_enabled() else None
    if library is None or element_size not in (2, 4) or numel >= _MAX_ELEMENTS or not dtype.is_floating_point:
        return dropout_mask_reference(shape, p, seed, dtype, device)
    mask = torch.empty(shape, dtype=dtype)
    keep_bits = int(torch.tensor(keep_scale(p), dtype=dtype).view(torch.int16 if element_size == 2 else torch.int32))
    status = library.nt_dropout_mask(mask.data_ptr(), numel, element_size, seed, dropout_threshold(p),
                                     keep_bits & _UINT32 if element_size == 4 else keep_bits & 0xFFFF,
                                     torch.get_num_threads())
    if status != 0:
        raise RuntimeError(f"dropout kernel failed with status {status}")
    return mask


def _fused_library(*tensors: torch.Tensor) -> ctypes.CDLL | None:
    """The kernel library when every tensor is a contiguous float32 CPU tensor, else None."""
    if not all(t.dtype == torch.float32 and t.is_cpu and t.is_contiguous() for t in tensors):
        return None
    if tensors[0].numel() >= _MAX_ELEMENTS or not kernels_enabled():
        return None
    return _get_library()


def apply_dropout(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """x * dropout_mask(x.shape, p, seed): one fused pass for float32 CPU tensors."""
    library = _fused_library(x)
    if library is None:
        return x * dropout_mask(x.shape, p, seed, x.dtype, x.device)
    out = torch.empty_like(x)
    library.nt_dropout_apply_f32(x.data_ptr(), out.data_ptr(), x.numel(), seed, dropout_threshold(p),
                                 keep_scale(p), 0, torch.get_num_threads())
    return out


def accumulate_dropout_grad(accumulator: torch.Tensor, grad: torch.Tensor, p: float, seed: int) -> None:
    """accumulator += grad * dropout_mask(grad.shape, p, seed), in place (the backward of apply_dropout)."""
    library = _fused_library(accumulator, grad) if accumulator.shape == grad.shape else None
    if library is None:
        accumulator.addcmul_(grad, dropout_mask(grad.shape, p, seed, grad.dtype, grad.device))
        return
    library.nt_dropout_apply_f32(grad.data_ptr(), accumulator.data_ptr(), grad.numel(), seed, dropout_threshold(p),
                                 keep_scale(p), 1, torch.get_num_threads())
