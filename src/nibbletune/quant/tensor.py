"""QuantizedTensor: one 4-bit weight in the bitsandbytes layout, and `quantize` to make one.

A QuantizedTensor is its storage tensors (`storage`: packed codes, absmax, and with double
quantization the nested absmax) plus a `QuantLayout` holding everything else (shape, dtype,
blocksize, code book, nested offset). Autograd functions save the storage with
`save_for_backward` and keep only the layout on ctx, then rebuild the tensor in backward with
`QuantizedTensor.from_storage`.

Under torch.compile, `dequantize` calls the custom op `nibbletune::dequantize_4bit`, which has a
fake (meta) implementation: Dynamo sees one opaque op with a known output shape and dtype instead
of tracing into (or breaking on) the kernel dispatch. Eagerly it calls the kernels directly (the
op's dispatch costs about 70 us a call on a CPU).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch

from ..errors import QuantizationError
from .blockwise import check_quantizable, pack_nibbles, quantize_blockwise_codes
from .codebooks import NESTED_BLOCKSIZE, QUANT_TYPES, codebook, codes_are_sorted, dynamic_map, quantize_bounds
from .dequantize import dequantize_4bit
from .double_quant import compress_absmax, decompress_absmax


class QuantLayout(NamedTuple):
    """Everything about a QuantizedTensor except its storage tensors (hashable; a torch.compile constant)."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    blocksize: int
    quant_type: str
    nested_offset: float | None
    """The double-quantization offset; None exactly when the absmax is stored as float32."""


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

    @property
    def storage(self) -> tuple[torch.Tensor, ...]:
        """The tensors that hold the data: (packed, absmax), plus nested_absmax with double quantization."""
        if self.nested_absmax is None:
            return (self.packed, self.absmax)
        return (self.packed, self.absmax, self.nested_absmax)

    @property
    def layout(self) -> QuantLayout:
        """The non-tensor fields (what `from_storage` needs besides `storage`)."""
        return QuantLayout(tuple(self.shape), self.dtype, self.blocksize, self.quant_type, self.nested_offset)

    @classmethod
    def from_storage(cls, layout: QuantLayout, storage: tuple[torch.Tensor, ...]) -> QuantizedTensor:
        """Rebuild a QuantizedTensor from `layout` and the tensors of `storage` (inverse of the two properties)."""
        nested_absmax = storage[2] if len(storage) > 2 else None
        return cls(storage[0], storage[1], torch.Size(layout.shape), layout.dtype, layout.blocksize,
                   layout.quant_type, nested_absmax, layout.nested_offset)

    def absmax_float32(self) -> torch.Tensor:
        """The per-block float32 scales, recovered from double quantization if needed."""
        if self.nested_absmax is None:
            return self.absmax
        return decompress_absmax(self.absmax, self.nested_absmax, self.nested_offset)

    def dequantize(self, dtype: torch.dtype | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """Decode to `dtype` (default: the original dtype) in the original shape.

        `out`, if given, is a contiguous tensor of that shape and dtype that receives the result;
        reusing one avoids an allocation per call (not under torch.compile, which traces the
        custom op instead: see the module docstring).
        """
        dtype = dtype or self.dtype
        if torch.compiler.is_compiling():
            offset = None if self.nested_offset is None else torch.tensor(self.nested_offset, dtype=torch.float64)
            return dequantize_4bit_op(self.packed, self.absmax, self.nested_absmax, offset, list(self.shape),
                                      self.blocksize, self.quant_type, dtype)
        return dequantize_4bit(self, dtype, out)

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

    `quant_type` is "nf4", "fp4" or "int4" (nibbletune's uniform grid, see `codebooks`; same
    storage, not writable as a bitsandbytes checkpoint). For nf4/fp4 the codes equal bitsandbytes `quantize_4bit(tensor, blocksize, quant_type=...,
    compress_statistics=double_quant)` byte for byte; with double quantization the 8-bit
    absmax codes use the exact-nearest rule (bitsandbytes' CPU lookup table differs on ~0.1%).
    Raises QuantizationError for NaN/inf values, unsupported dtypes or blocksizes.
    """
    if quant_type not in QUANT_TYPES:
        raise QuantizationError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")
    check_quantizable(tensor, blocksize)
    midpoints, order = quantize_bounds(quant_type, tensor.device)
    codes, absmax = quantize_blockwise_codes(
        tensor.detach().reshape(-1), midpoints, None if codes_are_sorted(quant_type) else order, blocksize
    )
    zero_code = int(order[int((midpoints < 0).sum())])
    packed = pack_nibbles(codes, pad_code=zero_code)
    if not double_quant:
        return QuantizedTensor(packed, absmax, tensor.shape, tensor.dtype, blocksize, quant_type)
    absmax_codes, nested_absmax, offset = compress_absmax(absmax)
    return QuantizedTensor(
        packed, absmax_codes, tensor.shape, tensor.dtype, blocksize, quant_type, nested_absmax, offset
    )


@torch.library.custom_op("nibbletune::dequantize_4bit", mutates_args=())
def dequantize_4bit_op(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    nested_absmax: torch.Tensor | None,
    nested_offset: torch.Tensor | None,
    shape: list[int],
    blocksize: int,
    quant_type: str,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Dequantize 4-bit codes to a new tensor of `shape` and `dtype` (opaque to torch.compile).

    The arguments are a QuantizedTensor's fields, flattened because a custom op's schema takes
    only tensors and scalars. `nested_offset` (with `nested_absmax`; None without double quant)
    is a 0-d tensor, not a float: Dynamo would bake a float into the graph, one graph per weight.
    """
    offset = float(nested_offset) if nested_absmax is not None and nested_offset is not None else None
    qt = QuantizedTensor(packed, absmax, torch.Size(shape), dtype, blocksize, quant_type, nested_absmax, offset)
    return dequantize_4bit(qt, dtype)


@dequantize_4bit_op.register_fake
def _dequantize_4bit_fake(packed, absmax, nested_absmax, nested_offset, shape, blocksize, quant_type, dtype):
    return packed.new_empty(shape, dtype=dtype)


def nested_quant_map(device: torch.device | str = "cpu") -> torch.Tensor:
    """The 256-entry map used for double-quantized absmax codes."""
    return dynamic_map(device)


__all__ = ["QuantizedTensor", "QuantLayout", "quantize", "NESTED_BLOCKSIZE", "nested_quant_map", "dequantize_4bit_op"]
