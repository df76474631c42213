"""Dequantization: one entry point that picks the fastest available kernel.

* CUDA tensors: the Triton kernel (`triton_kernel.py`) when Triton is installed.
* CPU tensors: the compiled C kernel (`cpu_kernel.py`) when a C compiler is available.
* Otherwise, and as the readable fallback, `dequantize_torch` below.

All paths compute codebook[code] * absmax in float32 and cast once to the target dtype,
so they agree bit for bit (the tests check every pair against `reference.py`).
"""

from __future__ import annotations

from functools import lru_cache

import torch

from ..native import kernels_enabled
from .codebooks import codebook
from .cpu_kernel import cpu_kernel_available, dequantize_cpu
from .outputs import check_output


@lru_cache(maxsize=8)
def _pair_table(quant_type: str, device: torch.device) -> torch.Tensor:
    values = codebook(quant_type)
    byte = torch.arange(256)
    return torch.stack([values[byte >> 4], values[byte & 15]], dim=1).to(device)


def dequantize_torch(qt, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """Pure-PyTorch dequantization through a 256-entry byte -> (high, low) value table."""
    n = qt.numel
    pairs = _pair_table(qt.quant_type, qt.device)[qt.packed.reshape(-1).long()]
    values = pairs.reshape(-1)[:n]
    absmax = qt.absmax_float32()
    full = n - n % qt.blocksize
    scaled = torch.empty(n, dtype=torch.float32, device=qt.device)
    if full:
        scaled[:full] = (values[:full].view(-1, qt.blocksize) * absmax[: full // qt.blocksize, None]).view(-1)
    if full < n:
        scaled[full:] = values[full:] * absmax[-1]
    result = scaled.to(dtype).view(qt.shape)
    if out is not None:
        out.copy_(result)
        return out
    return result


def dequantize_4bit(qt, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """Decode a QuantizedTensor to `dtype`, into `out` when given."""
    check_output(qt, dtype, out)
    if kernels_enabled():
        if qt.device.type == "cuda":
            from .triton_kernel import dequantize_triton, triton_available  # imports triton: only when needed

            if triton_available():
                return dequantize_triton(qt, dtype, out)
        elif qt.device.type == "cpu" and cpu_kernel_available():
            return dequantize_cpu(qt, dtype, out)
    return dequantize_torch(qt, dtype, out)
