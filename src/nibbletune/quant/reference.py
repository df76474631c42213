"""Slow, exact, readable reference of the 4-bit format, used only to check the fast paths.

It is written differently from the production code on purpose (per-element block
indices, explicit midpoint comparisons, no chunking, no packing tricks) so that the two
agreeing means something.
"""

from __future__ import annotations

import torch

from .codebooks import NESTED_BLOCKSIZE, codebook, dynamic_map, quantize_bounds


def _scale(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = flat.numel()
    block_of = torch.arange(n) // blocksize
    blocks = (n + blocksize - 1) // blocksize
    absmax = torch.zeros(blocks, dtype=torch.float32).scatter_reduce(0, block_of, flat.abs(), "amax")
    full_blocks = n // blocksize
    scaled = torch.empty(n, dtype=torch.float32)
    if full_blocks:
        reciprocal = 1.0 / absmax[:full_blocks].clamp(min=1e-38)
        end = full_blocks * blocksize
        scaled[:end] = flat[:end] * reciprocal[block_of[:end]]
    if full_blocks < blocks:
        absmax[-1] = absmax[-1].clamp(min=1e-38)
        start = full_blocks * blocksize
        scaled[start:] = flat[start:] / absmax[-1]
    return absmax, scaled.clamp(-1, 1)


def reference_codes(flat: torch.Tensor, midpoints: torch.Tensor, order: torch.Tensor | None, blocksize: int):
    """Return (codes as int64 per element, float32 absmax) by explicit midpoint counting."""
    absmax, scaled = _scale(flat.float().cpu(), blocksize)
    position = (scaled[:, None] > midpoints.cpu()[None, :]).sum(dim=1)
    codes = order.cpu().long()[position] if order is not None else position
    return codes, absmax


def reference_quantize_4bit(tensor: torch.Tensor, quant_type: str, blocksize: int):
    """Return (packed uint8 [(n+1)//2, 1], float32 absmax) of the 4-bit format."""
    midpoints, order = quantize_bounds(quant_type)
    codes, absmax = reference_codes(tensor.reshape(-1), midpoints, order, blocksize)
    if codes.numel() % 2:
        pad = int(order[int((midpoints < 0).sum())])
        codes = torch.cat([codes, torch.tensor([pad])])
    packed = (codes[0::2] * 16 + codes[1::2]).to(torch.uint8).unsqueeze(1)
    return packed, absmax


def reference_dequantize_4bit(packed, absmax, shape, dtype, quant_type: str, blocksize: int) -> torch.Tensor:
    """Decode packed 4-bit codes with a float32 absmax back to `shape` and `dtype`."""
    n = 1
    for size in shape:
        n *= size
    flat = packed.reshape(-1).cpu().long()
    codes = torch.empty(flat.numel() * 2, dtype=torch.long)
    codes[0::2] = flat // 16
    codes[1::2] = flat % 16
    values = codebook(quant_type)[codes[:n]]
    block_of = torch.arange(n) // blocksize
    return (values * absmax.cpu().float()[block_of]).to(dtype).reshape(shape)


def reference_compress_absmax(absmax: torch.Tensor):
    """Return (uint8 codes, nested_absmax, offset) of double quantization."""
    offset = absmax.mean()
    values = dynamic_map()
    midpoints = (values[:-1] + values[1:]) / 2
    codes, nested = reference_codes(absmax - offset, midpoints, None, NESTED_BLOCKSIZE)
    return codes.to(torch.uint8), nested, float(offset)


def reference_decompress_absmax(codes, nested_absmax, offset: float) -> torch.Tensor:
    """Recover float32 absmax from double-quantized codes."""
    block_of = torch.arange(codes.numel()) // NESTED_BLOCKSIZE
    scaled = dynamic_map()[codes.long().cpu()] * nested_absmax.cpu()[block_of]
    return scaled + torch.tensor(offset, dtype=torch.float32)
