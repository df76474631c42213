"""One autograd op for a whole LoRA layer on a frozen base: the eager fast path of LoraLinear.

With x flattened to [T, in], W the frozen base weight [out, in] (dequantized on the fly when it
is 4-bit), A = lora_A [r, in], B = lora_B [out, r], s the LoRA scaling and M the dropout mask
of `dropout.py` (all ones without dropout):

    xd = x * M                                          [T, in]
    h  = s * (xd @ A^T)                                 [T, r]
    y  = x @ W^T + bias + h @ B^T                       [T, out]

and, with g = dL/dy [T, out] and gh = s * (g @ B) [T, r]:

    dL/dB = g^T @ h                                     [out, r]
    dL/dA = gh^T @ xd                                   [r, in]
    dL/dx = g @ W + (gh @ A) * M                        [T, in]
    dL/dbias = sum over T of g (only when the bias trains)

Why not plain autograd through nn.Linear and nn.Dropout (the composable path in `lora.py`,
kept for torch.compile and DoRA): on a CPU the LoRA branch is many small operations over
[T, in] and [T, out] activations. Here the scaling multiplies the small [T, r] tensor, the
LoRA output is accumulated into the base output by the same GEMM (addmm_), the dropout mask
is regenerated from its seed in backward instead of being stored, and the LoRA part of dL/dx
is accumulated into g @ W in one pass (`accumulate_dropout_grad` / addmm_). Saved for backward: the
4-bit weight's storage (or the frozen dense weight), A, B, xd and h, which is what autograd would keep.

Everything runs in the compute dtype: A and B (small) are cast to it, not x (large) to the adapter
dtype as PEFT does, so a bf16 step makes no float32 copies of its activations; the gradients of A
and B are cast back to the adapter dtype (float32 by default) for the optimizer. In float32
compute this is PEFT's arithmetic; in bf16 the branch rounds like the base matmul does (PEFT
under autocast does the same).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..quant import QuantizedTensor
from ..quant.scratch import dequantize_scratch
from ..quant.tensor import QuantLayout
from .dropout import accumulate_dropout_grad, apply_dropout


class LoraSpec(NamedTuple):
    """The non-tensor arguments of one LoRA layer call."""

    scaling: float
    dropout_p: float
    """0 in eval mode or without dropout."""
    dropout_seed: int
    compute_dtype: torch.dtype
    """dtype of the base matmul and of the LoRA branch (A and B are cast to it)."""


FrozenWeight = QuantizedTensor | torch.Tensor
"""A frozen base weight [out, in]: 4-bit, or a dense tensor."""


def _storage(weight: FrozenWeight) -> tuple[tuple[torch.Tensor, ...], QuantLayout | None]:
    """(tensors to save for backward, layout to rebuild a QuantizedTensor; None for a dense weight)."""
    if isinstance(weight, QuantizedTensor):
        return weight.storage, weight.layout
    return (weight,), None


def rebuild_weight(saved: tuple[torch.Tensor, ...], layout: QuantLayout | None) -> FrozenWeight:
    """The frozen weight from its storage tensors and layout (None: a dense tensor, the one tensor saved)."""
    return saved[0] if layout is None else QuantizedTensor.from_storage(layout, saved)


def _dense(weight: FrozenWeight, dtype: torch.dtype) -> torch.Tensor:
    """The frozen weight as a dense `dtype` tensor [out, in]; when 4-bit, a scratch buffer valid for one matmul."""
    if isinstance(weight, QuantizedTensor):
        return dequantize_scratch(weight, dtype)
    return weight.to(dtype)


def lora_forward(x, bias, lora_A, lora_B, spec: LoraSpec, weight: FrozenWeight):
    """The forward formula: (y [..., out], xd [T, in], h [T, r]) for x [..., in]; xd and h are what backward needs."""
    dtype = spec.compute_dtype
    in_features, out_features = lora_A.shape[1], lora_B.shape[0]
    leading_shape = x.shape[:-1]
    x2 = x.reshape(-1, in_features).to(dtype)
    a, b = lora_A.to(dtype), lora_B.to(dtype)  # [r, in], [out, r]: small
    out = F.linear(x2, _dense(weight, dtype), bias)  # [T, out]
    xd = apply_dropout(x2.contiguous(), spec.dropout_p, spec.dropout_seed) if spec.dropout_p > 0 else x2
    h = (xd @ a.t()).mul_(spec.scaling)  # [T, r]
    out.addmm_(h, b.t())
    return out.reshape(*leading_shape, out_features), xd, h


def lora_backward(grad_out, xd, h, lora_A, lora_B, spec: LoraSpec, weight: FrozenWeight, x_dtype: torch.dtype,
                  needs: tuple[bool, bool, bool, bool]):
    """The backward formula: (dL/dx, dL/dbias, dL/dA, dL/dB), each None where `needs` (x, bias, A, B) is False.

    The adapter gradients come back in the adapter parameters' dtype, dL/dx in `x_dtype`.
    """
    need_x, need_bias, need_A, need_B = needs
    dtype = spec.compute_dtype
    a, b = lora_A.to(dtype), lora_B.to(dtype)
    leading_shape = grad_out.shape[:-1]
    g = grad_out.reshape(-1, b.shape[0]).to(dtype)
    grad_x = grad_bias = grad_A = grad_B = None
    gh = (g @ b).mul_(spec.scaling)  # [T, r]
    if need_A:
        grad_A = (gh.t() @ xd).to(lora_A.dtype)
    if need_B:
        grad_B = (g.t() @ h).to(lora_B.dtype)
    if need_x:
        dense = _dense(weight, dtype)
        grad_x = g @ dense  # [T, in]
        del dense
        if spec.dropout_p > 0:
            accumulate_dropout_grad(grad_x, gh @ a, spec.dropout_p, spec.dropout_seed)
        else:
            grad_x.addmm_(gh, a)
        grad_x = grad_x.to(x_dtype).reshape(*leading_shape, a.shape[1])
    if need_bias:
        grad_bias = g.sum(0)
    return grad_x, grad_bias, grad_A, grad_B


class LoraLinearFunction(torch.autograd.Function):
    """y = x W^T + bias + s * (x * M) A^T B^T for a frozen W; see the module docstring.

    `apply(x, bias, lora_A, lora_B, spec, weight)`: x [..., in]; bias (compute dtype) or None;
    lora_A [r, in]; lora_B [out, r]; spec a LoraSpec; weight the frozen base weight, a
    QuantizedTensor or a dense tensor.
    """

    @staticmethod
    def forward(ctx, x, bias, lora_A, lora_B, spec: LoraSpec, weight: FrozenWeight):
        with torch.autocast(x.device.type, enabled=False):  # the layer picks its own dtype
            out, xd, h = lora_forward(x, bias, lora_A, lora_B, spec, weight)
        weight_tensors, ctx.weight_layout = _storage(weight)
        ctx.save_for_backward(xd, h, lora_A, lora_B, *weight_tensors)
        ctx.spec, ctx.x_dtype, ctx.has_bias = spec, x.dtype, bias is not None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        xd, h, lora_A, lora_B, *weight_tensors = ctx.saved_tensors
        weight = rebuild_weight(tuple(weight_tensors), ctx.weight_layout)
        needs = (ctx.needs_input_grad[0], ctx.has_bias and ctx.needs_input_grad[1], *ctx.needs_input_grad[2:4])
        with torch.autocast(grad_out.device.type, enabled=False):
            grads = lora_backward(grad_out, xd, h, lora_A, lora_B, ctx.spec, weight, ctx.x_dtype, needs)
        return (*grads, None, None)
