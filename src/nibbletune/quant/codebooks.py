"""The codebooks of the 4-bit layout and the 8-bit map of double quantization.

NF4, FP4 and the dynamic map are built exactly the way bitsandbytes builds them (same float32
arithmetic), so that codes and dequantized values agree bit for bit; the tests re-check each
table against the installed bitsandbytes.

INT4 is nibbletune's own: the uniform, symmetric "mid-rise" grid (2i - 15) / 15 for code i,
i.e. {-15, -13, ..., -1, +1, ..., +13, +15} / 15. Same storage and kernels as NF4/FP4 (only
the table differs), but bitsandbytes has no such type, so it is never written in its layout
(`BNB_QUANT_TYPES`). Why this grid rather than the integers {-8..7} / 7 (clipped) or {-7..7} / 7:

* it is symmetric, so a block's sign never matters; {-8..7} / 7 is not (-8 / 7 lies outside
  [-1, 1] and is never reached after absmax scaling, so one code is wasted);
* all 16 codes are distinct, evenly spaced levels (step 2/15): {-7..7} / 7 has only 15 levels
  (step 1/7), so its worst-case rounding error (1/14 of the absmax) is larger than this grid's
  (1/15), and the 16th code is unused;
* both ends are exactly +-1, so the block's largest element is stored exactly, as with NF4.

The price is no exact zero: 0 decodes to -absmax / 15 (a tie at the midpoint 0 goes to the lower
code), an error no larger than the worst case elsewhere. An all-zero block has absmax 0 and still
decodes to zeros.
"""

from __future__ import annotations

from functools import cache

import torch

QUANT_TYPES = ("nf4", "fp4", "int4")
BNB_QUANT_TYPES = ("nf4", "fp4")
"""The code books bitsandbytes knows: the only ones written in its checkpoint layout."""
NESTED_BLOCKSIZE = 256

# Quantiles of N(0, 1) rescaled to [-1, 1] with an exact zero (QLoRA paper, appendix E).
_NF4_VALUES = [
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
]

# bitsandbytes' e2m1 variant before normalisation; index i + 8 mirrors index i.
# "-0" is the integer zero in bitsandbytes' list too, so index 8 decodes to +0.0.
_FP4_RAW = [0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0]


@cache
def _codebook_cpu(quant_type: str) -> torch.Tensor:
    if quant_type == "nf4":
        return torch.tensor(_NF4_VALUES, dtype=torch.float32)
    if quant_type == "fp4":
        raw = torch.tensor(_FP4_RAW, dtype=torch.float32)
        return raw / raw.abs().max()
    if quant_type == "int4":
        return (torch.arange(16, dtype=torch.float32) * 2 - 15) / 15
    raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")


def codebook(quant_type: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """Return the 16 float32 values that 4-bit codes 0..15 decode to (before the absmax scale).

    A fresh tensor each call: callers may store or modify it without touching the cache (and
    state dicts built from it share no memory, which safetensors refuses).
    """
    return _codebook_cpu(quant_type).to(device, copy=True)


@cache
def _bounds_cpu(quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    values = _codebook_cpu(quant_type)
    order = torch.argsort(values, stable=True)
    sorted_values = values[order]
    midpoints = (sorted_values[:-1] + sorted_values[1:]) / 2
    return midpoints, order.to(torch.uint8)


def codes_are_sorted(quant_type: str) -> bool:
    """True when code i is the i-th smallest value (NF4, INT4), so nearest-code search needs no `order` map."""
    _, order = _bounds_cpu(quant_type)
    return bool(torch.equal(order, torch.arange(16, dtype=torch.uint8)))


def quantize_bounds(quant_type: str, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Return (midpoints, order) for nearest-code search.

    midpoints: the 15 float32 midpoints between consecutive *sorted* codebook values.
    order: uint8 map from a sorted position to the code index (identity for NF4).
    A scaled value x gets code order[#(midpoints < x)], so a tie goes to the lower position.
    """
    midpoints, order = _bounds_cpu(quant_type)
    return midpoints.to(device), order.to(device)


@cache
def _dynamic_map_cpu() -> torch.Tensor:
    # bitsandbytes.functional.create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8)
    max_exponent_bits, non_sign_bits = 7, 7
    data: list[float] = []
    for i in range(max_exponent_bits):
        fraction_items = int(2 ** (i + non_sign_bits - max_exponent_bits) + 1)
        boundaries = torch.linspace(0.1, 1, fraction_items, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        scale = 10 ** (-(max_exponent_bits - 1) + i)
        data += (scale * means).tolist()
        data += (-scale * means).tolist()
    data.append(0)
    data.append(1.0)
    data += [0] * (256 - len(data))
    data.sort()
    return torch.tensor(data, dtype=torch.float32)


def dynamic_map(device: torch.device | str = "cpu") -> torch.Tensor:
    """Return bitsandbytes' signed 8-bit dynamic map (256 sorted float32 values in [-0.993, 1]).

    A fresh tensor each call, like `codebook`.
    """
    return _dynamic_map_cpu().to(device, copy=True)


def dynamic_map_midpoints(device: torch.device | str = "cpu") -> torch.Tensor:
    """Return the 255 float32 midpoints between consecutive values of the dynamic map."""
    values = _dynamic_map_cpu()
    return ((values[:-1] + values[1:]) / 2).to(device)


def bits_per_parameter(blocksize: int, double_quant: bool) -> float:
    """Storage cost of the format in bits per weight, statistics included."""
    if double_quant:
        return 4 + 8 / blocksize + 32 / (blocksize * NESTED_BLOCKSIZE)
    return 4 + 32 / blocksize
