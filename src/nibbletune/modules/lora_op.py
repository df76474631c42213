"""The LoRA layer as two custom ops, so torch.compile keeps the eager fast path.

`nibbletune::lora_linear` (forward) and `nibbletune::lora_linear_backward` are the formulas of
`lora_function.py` behind `torch.library.custom_op`: Dynamo and Inductor see each LoRA linear as
one opaque call with known output shapes, so a compiled decoder layer is one graph (no graph
break per linear) whose norms, rotary embedding, activation and residual adds Inductor fuses,
while the matmuls, the 4-bit decode into the scratch buffer and the hashed dropout stay ours.

A custom op's schema takes only tensors and scalars, so the frozen weight travels as its
storage tensors plus its layout fields (`quant_type` "dense" for an unquantized weight). What
differs between calls of one graph travels as tensors, since Dynamo bakes Python numbers into
the graph: the dropout seed (an int64 tensor; as an int it would recompile every step) and the
double-quant offset (a float64 tensor; as a float it would recompile every layer).

Unlike the eager autograd Function, backward regenerates the dropped-out input from
the saved input and the seed instead of saving it.
"""

from __future__ import annotations

import torch
from torch import nn

from ..quant.tensor import QuantLayout
from .dropout import apply_dropout
from .linear_nf4 import LinearNF4
from .lora_function import FrozenWeight, LoraSpec, lora_backward, lora_forward, rebuild_weight

DENSE = "dense"
"""`quant_type` of an unquantized frozen weight."""

_SEED_BITS = (1 << 64) - 1


def _weight(storage: list[torch.Tensor], shape: list[int], weight_dtype: torch.dtype, blocksize: int,
            quant_type: str, nested_offset: torch.Tensor | None) -> FrozenWeight:
    offset = None if nested_offset is None else float(nested_offset)
    layout = None if quant_type == DENSE else QuantLayout(tuple(shape), weight_dtype, blocksize, quant_type, offset)
    return rebuild_weight(tuple(storage), layout)


def _spec(scaling: float, dropout_p: float, seed: torch.Tensor, compute_dtype: torch.dtype) -> LoraSpec:
    return LoraSpec(scaling, dropout_p, int(seed) & _SEED_BITS if dropout_p > 0 else 0, compute_dtype)


@torch.library.custom_op("nibbletune::lora_linear", mutates_args=())
def lora_linear_op(x: torch.Tensor, bias: torch.Tensor | None, lora_A: torch.Tensor, lora_B: torch.Tensor,
                   storage: list[torch.Tensor], shape: list[int], weight_dtype: torch.dtype, blocksize: int,
                   quant_type: str, nested_offset: torch.Tensor | None, scaling: float, dropout_p: float,
                   seed: torch.Tensor, compute_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(y [..., out], h [T, r]) of one LoRA linear; the arguments are `lora_linear`'s, flattened."""
    weight = _weight(storage, shape, weight_dtype, blocksize, quant_type, nested_offset)
    out, _, h = lora_forward(x, bias, lora_A, lora_B, _spec(scaling, dropout_p, seed, compute_dtype), weight)
    return out, h


@lora_linear_op.register_fake
def _lora_linear_fake(x, bias, lora_A, lora_B, storage, shape, weight_dtype, blocksize, quant_type, nested_offset,
                      scaling, dropout_p, seed, compute_dtype):
    tokens = x.numel() // x.shape[-1]
    return (x.new_empty((*x.shape[:-1], lora_B.shape[0]), dtype=compute_dtype),
            x.new_empty((tokens, lora_A.shape[0]), dtype=compute_dtype))


@torch.library.custom_op("nibbletune::lora_linear_backward", mutates_args=())
def lora_linear_backward_op(grad_out: torch.Tensor, x: torch.Tensor, h: torch.Tensor, lora_A: torch.Tensor,
                            lora_B: torch.Tensor, storage: list[torch.Tensor], shape: list[int],
                            weight_dtype: torch.dtype, blocksize: int, quant_type: str,
                            nested_offset: torch.Tensor | None, scaling: float, dropout_p: float,
                            seed: torch.Tensor, compute_dtype: torch.dtype, needs: list[bool],
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dL/dx, dL/dbias, dL/dA, dL/dB); an empty tensor stands for a gradient `needs` did not ask for."""
    spec = _spec(scaling, dropout_p, seed, compute_dtype)
    x2 = x.reshape(-1, lora_A.shape[1]).to(compute_dtype)
    xd = apply_dropout(x2.contiguous(), spec.dropout_p, spec.dropout_seed) if spec.dropout_p > 0 else x2
    weight = _weight(storage, shape, weight_dtype, blocksize, quant_type, nested_offset)
    grads = lora_backward(grad_out, xd, h, lora_A, lora_B, spec, weight, x.dtype, tuple(needs))
    return tuple(g if g is not None else grad_out.new_empty(0) for g in grads)


@lora_linear_backward_op.register_fake
def _lora_linear_backward_fake(grad_out, x, h, lora_A, lora_B, storage, shape, weight_dtype, blocksize, quant_type,
                               nested_offset, scaling, dropout_p, seed, compute_dtype, needs):
    shapes = (x.shape, (lora_B.shape[0],), lora_A.shape, lora_B.shape)
    dtypes = (x.dtype, compute_dtype, lora_A.dtype, lora_B.dtype)
    return tuple(grad_out.new_empty(shape if need else (0,), dtype=dtype)
                 for shape, dtype, need in zip(shapes, dtypes, needs))


def _setup_context(ctx, inputs, output):
    x, bias, lora_A, lora_B, storage, *scalars_and_seed = inputs
    *scalars, seed, compute_dtype = scalars_and_seed
    ctx.save_for_backward(x, output[1], lora_A, lora_B, seed, *storage)
    ctx.scalars = (*scalars, compute_dtype)
    ctx.has_bias = bias is not None


def _backward(ctx, grad_out, grad_h):
    x, h, lora_A, lora_B, seed, *storage = ctx.saved_tensors
    shape, weight_dtype, blocksize, quant_type, nested_offset, scaling, dropout_p, compute_dtype = ctx.scalars
    needs = [ctx.needs_input_grad[0], ctx.has_bias and ctx.needs_input_grad[1], *ctx.needs_input_grad[2:4]]
    grads = lora_linear_backward_op(grad_out, x, h, lora_A, lora_B, storage, shape, weight_dtype, blocksize,
                                    quant_type, nested_offset, scaling, dropout_p, seed, compute_dtype, needs)
    grad_x, grad_bias, grad_A, grad_B = (g if need else None for g, need in zip(grads, needs))
    no_weight_grad = [None] * len(storage)  # a list input takes a list of gradients
    return (grad_x, grad_bias, grad_A, grad_B, no_weight_grad, *[None] * 9)  # nor for the layout, scalars, seed


lora_linear_op.register_autograd(_backward, setup_context=_setup_context)


def lora_linear(x: torch.Tensor, bias: torch.Tensor | None, lora_A: torch.Tensor, lora_B: torch.Tensor,
                spec: LoraSpec, base: nn.Module, seed: torch.Tensor) -> torch.Tensor:
    """`LoraLinearFunction.apply` through the custom ops: the same y, traceable by torch.compile.

    `base` is the frozen LinearNF4 or nn.Linear; `seed` the dropout seed as an int64 tensor
    (`spec.dropout_seed` is ignored).
    """
    if isinstance(base, LinearNF4):
        storage, layout, nested_offset = base.traceable_weight()
        shape, weight_dtype = list(layout.shape), layout.dtype
        blocksize, quant_type = layout.blocksize, layout.quant_type
    else:
        storage, shape, weight_dtype = [base.weight], list(base.weight.shape), base.weight.dtype
        blocksize, quant_type, nested_offset = 0, DENSE, None
    out, _ = lora_linear_op(x, bias, lora_A, lora_B, storage, shape, weight_dtype, blocksize, quant_type,
                            nested_offset, spec.scaling, spec.dropout_p, seed, spec.compute_dtype)
    return out
