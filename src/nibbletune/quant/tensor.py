"""QuantizedTensor: one 4-bit weight in the bitsandbytes layout, and `quantize` to make one."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from ..errors import QuantizationError
from .blockwise import check_quantizable, pack_nibbles, quantize_blockwise_codes
from .codebooks import NESTED_BLOCKSIZE, QUANT_TYPES, codebook, dynamic_map, quantize_bounds
from .double_quant import compress_absmax, decompress_absmax


@dataclass(eq=False)
class QuantizedTensor:
    """A frozen tensor stored as 4-bit codes with blockwise absmax scales.

    packed: uint8 of shape ((numel + 1) // 2, 1); element 2i in the high nibble.
    absmax: float32 per block, or uint8 codes when double quantized.
    nested_absmax / nested_offset: the second-level scale and offset (double quant only).
    shape / dtype: what `dequantize()` returns by default.
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int
    quant_type: str
    nested_absmax: torch.Tensor | None = None
    nested_offset: float | None = None

    @property
    def double_quant(self) -> bool:
        """True when absmax is stored as 8-bit codes."""
        return self.nested_absmax is not None

    @property
    def numel(self) -> int:
        """Number of quantized elements."""
        return math.prod(self.shape)

    @property
    def num_blocks(self) -> int:
        """Number of absmax blocks."""
        return -(-self.numel // self.blocksize)

    @property
    def device(self) -> torch.device:
        """Device of the packed codes."""
        return self.packed.device

    @property
    def quant_map(self) -> torch.Tensor:
        """The 16-entry float32 codebook on this tensor's device."""
        return codebook(self.quant_type, self.device)

    @property
    def nbytes(self) -> int:
        """Bytes of storage: codes plus statistics."""
        total = self.packed.numel() + self.absmax.numel() * self.absmax.element_size()
        if self.nested_absmax is not None:
            total += self.nested_absmax.numel() * 4 + 4
        return total

    def absmax_float32(self) -> torch.Tensor:
        """The per-block float32 scales, recovered from double quantization if needed."""
        if self.nested_absmax is None:
            return self.absmax
        return decompress_absmax(self.absmax, self.nested_absmax, self.nested_offset)

    def dequantize(self, dtype: torch.dtype | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """Decode to `dtype` (default: the original dtype) in the original shape.

        `out`, if given, is a contiguous tensor of that shape and dtype that receives the result;
        reusing one avoids an allocation per call.
        """
        from .dequantize import dequantize_4bit

        return dequantize_4bit(self, dtype or self.dtype, out)

    def to(self, device: torch.device | str) -> QuantizedTensor:
        """Return a copy on `device` (bytes unchanged; nothing is re-quantized)."""
        return replace(
            self,
            packed=self.packed.to(device),
            absmax=self.absmax.to(device),
            nested_absmax=None if self.nested_absmax is None else self.nested_absmax.to(device),
        )

    def __repr__(self) -> str:
        dq = ", double_quant" if self.double_quant else ""
        return (
            f"QuantizedTensor(shape={tuple(self.shape)}, dtype={self.dtype}, {self.quant_type}, "
            f"blocksize={self.blocksize}{dq}, device={self.device})"
        )


def quantize(
    tensor: torch.Tensor,
    quant_type: str = "nf4",
    blocksize: int = 64,
    double_quant: bool = True,
) -> QuantizedTensor:
    """Quantize a float32/float16/bfloat16 tensor to the bitsandbytes 4-bit layout.

    The codes equal bitsandbytes `quantize_4bit(tensor, blocksize, quant_type=...,
    compress_statistics=double_quant)` byte for byte; with double quantization the 8-bit
    absmax codes use the exact-nearest rule (bitsandbytes' CPU lookup table differs on ~0.1%).
    Raises QuantizationError for NaN/inf values, unsupported dtypes or blocksizes.
    """
    if quant_type not in QUANT_TYPES:
        raise QuantizationError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")
    check_quantizable(tensor, blocksize)
    midpoints, order = quantize_bounds(quant_type, tensor.device)
    identity = quant_type == "nf4"
    codes, absmax = quantize_blockwise_codes(
        tensor.detach().reshape(-1), midpoints, None if identity else order, blocksize
    )
    zero_code = int(order[int((midpoints < 0).sum())])
    packed = pack_nibbles(codes, pad_code=zero_code)
    if not double_quant:
        return QuantizedTensor(packed, absmax, tensor.shape, tensor.dtype, blocksize, quant_type)
    absmax_codes, nested_absmax, offset = compress_absmax(absmax)
    return QuantizedTensor(
        packed, absmax_codes, tensor.shape, tensor.dtype, blocksize, quant_type, nested_absmax, offset
    )


def nested_quant_map(device: torch.device | str = "cpu") -> torch.Tensor:
    """The 256-entry map used for double-quantized absmax codes."""
    return dynamic_map(device)


__all__ = ["QuantizedTensor", "quantize", "NESTED_BLOCKSIZE", "nested_quant_map"]
