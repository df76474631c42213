"""Dequantize into a reused buffer per (shape, dtype, device): no fresh allocation per matmul.

A training step dequantizes every frozen weight twice (forward and backward) and drops the copy
right after its matmul. Allocating that copy anew each time costs more than decoding it: large
allocations come straight from the OS as fresh pages, and the first write to each page faults
(`python benchmarks/dequant.py --quick`, 4096x4096 to bf16 on a 2-core AVX512 CPU: 1.0 Gparam/s
into fresh memory, 2.3 into a reused tensor). So the layers decode into one buffer per weight shape, reused by every
layer of that shape.

The result is valid until the next `dequantize_scratch` call with the same shape, dtype and
device, so a caller must be done with it before dequantizing another weight of that shape: the
4-bit layers use it for exactly one matmul. Buffers are per thread (two threads never share
one); on CUDA, kernels on one stream run in order, so reuse after the matmul is safe there too.
Under torch.compile the plain `dequantize` (a traced custom op) is used instead.
"""

from __future__ import annotations

import threading

import torch

from .tensor import QuantizedTensor

_local = threading.local()


def _buffers() -> dict[tuple, torch.Tensor]:
    buffers = getattr(_local, "buffers", None)
    if buffers is None:
        buffers = _local.buffers = {}
    return buffers


def dequantize_scratch(weight: QuantizedTensor, dtype: torch.dtype) -> torch.Tensor:
    """`weight` decoded to `dtype` in this thread's scratch buffer for its shape (see the module docstring)."""
    if torch.compiler.is_compiling():
        return weight.dequantize(dtype)
    key = (tuple(weight.shape), dtype, weight.device)
    buffers = _buffers()
    out = buffers.get(key)
    if out is None:
        out = buffers[key] = torch.empty(key[0], dtype=dtype, device=weight.device)
    return weight.dequantize(dtype, out=out)


def scratch_bytes() -> int:
    """Bytes held by this thread's scratch buffers."""
    return sum(buffer.numel() * buffer.element_size() for buffer in _buffers().values())


def release_scratch() -> None:
    """Free this thread's scratch buffers (they are rebuilt on the next use)."""
    _buffers().clear()
