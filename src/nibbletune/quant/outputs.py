"""The output side of dequantization: the dtypes it can produce and the check on a caller's `out=` buffer.

Shared by the dispatching entry point (`dequantize.py`) and both kernels, which may also be
called directly.
"""

from __future__ import annotations

import torch

from ..errors import QuantizationError

OUTPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_output(qt, dtype: torch.dtype, out: torch.Tensor | None) -> None:
    """Raise QuantizationError unless `dtype` is decodable and `out` (if given) can receive `qt` decoded to it."""
    if dtype not in OUTPUT_DTYPES:
        raise QuantizationError(f"can dequantize to float32, float16 or bfloat16, not {dtype}")
    if out is None:
        return
    if out.shape != qt.shape or out.dtype != dtype or out.device != qt.device or not out.is_contiguous():
        raise QuantizationError(
            f"out must be a contiguous {dtype} tensor of shape {tuple(qt.shape)} on {qt.device}, "
            f"got {out.dtype} {tuple(out.shape)} on {out.device}"
        )
