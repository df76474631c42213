"""Double quantization: the float32 per-block absmax stored as 8-bit codes.

offset = mean(absmax); the centred values absmax - offset are quantized blockwise
(NESTED_BLOCKSIZE per block) to bitsandbytes' signed dynamic map with the exact-nearest
rule (float32 midpoints, ties to the lower code). Recovery is two float32 operations,
map[code] * nested_absmax + offset, in that order and never fused, which is what
bitsandbytes computes.
"""

from __future__ import annotations

import torch

from .blockwise import quantize_blockwise_codes
from .codebooks import NESTED_BLOCKSIZE, dynamic_map, dynamic_map_midpoints


def compress_absmax(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Return (uint8 absmax codes, float32 nested_absmax, offset) for a float32 absmax vector."""
    offset = absmax.mean()
    centred = absmax - offset
    codes, nested_absmax = quantize_blockwise_codes(
        centred, dynamic_map_midpoints(absmax.device), None, NESTED_BLOCKSIZE
    )
    return codes, nested_absmax, float(offset.item())


def decompress_absmax(codes: torch.Tensor, nested_absmax: torch.Tensor, offset: float) -> torch.Tensor:
    """Recover the float32 absmax vector from its 8-bit codes."""
    values = dynamic_map(codes.device)[codes.long()]
    n = values.numel()
    full = n - n % NESTED_BLOCKSIZE
    scaled = torch.empty_like(values)
    if full:
        scaled[:full] = (values[:full].view(-1, NESTED_BLOCKSIZE) * nested_absmax[: full // NESTED_BLOCKSIZE, None]).view(-1)
    if full < n:
        scaled[full:] = values[full:] * nested_absmax[-1]
    return scaled + torch.tensor(offset, dtype=torch.float32, device=codes.device)
