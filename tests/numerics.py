"""Tolerances derived from the compute dtype a test actually ran in, each from a bound it states.

u is the unit roundoff of the dtype (half an ulp at 1): float32 2^-24, bfloat16 2^-8, float16
2^-11. One rounding of a value x to the dtype moves it by at most u * |x|.

`rounding_tolerance` is for two evaluations of the same function that differ only in where and
in what order they round (our fused LoRA op against PEFT's separate modules, our dequantize +
matmul against bitsandbytes', a merged weight against base + adapter). To first order each
rounding whose placement differs perturbs one intermediate value by at most u times its size;
in a residual network an error in the stream reaches the output with a gain of about one, so
with `roundings` such steps between input and output, of values no larger than the output
scale S = max |reference|, the outputs differ by at most

    2 * roundings * u * S            (both sides may round, in opposite directions)

The gain-of-one step is the part that is not a proof; tests pass `roundings` counted per layer
(two or three per linear layer a value passes through, as each test says), and a test that
wants a hard guarantee compares bit for bit instead.
"""

from __future__ import annotations

import torch

UNIT_ROUNDOFF = {torch.float32: 2.0 ** -24, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}


def as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """torch.bfloat16 for "bfloat16" (and torch dtypes unchanged)."""
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def unit_roundoff(dtype: torch.dtype | str) -> float:
    """Half an ulp at 1 in `dtype`."""
    return UNIT_ROUNDOFF[as_dtype(dtype)]


def rounding_tolerance(dtype: torch.dtype | str, reference: torch.Tensor, roundings: int) -> float:
    """2 * roundings * u * max|reference| (module docstring)."""
    return 2 * roundings * unit_roundoff(dtype) * float(reference.detach().abs().max())


def assert_close_rounding(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | str,
                          roundings: int) -> None:
    """assert |actual - expected| <= rounding_tolerance(dtype, expected, roundings) elementwise."""
    limit = rounding_tolerance(dtype, expected, roundings)
    torch.testing.assert_close(actual.float(), expected.float(), atol=limit, rtol=0,
                               msg=lambda m: f"{m}\n(bound: {roundings} roundings in {dtype}: {limit:.3g})")
