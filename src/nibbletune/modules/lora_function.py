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

The branch runs in the adapter dtype on x cast to it and is cast to the base output's dtype
before the sum, as PEFT does; the base runs in its compute dtype.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..quant import QuantizedTensor
from ..quant.tensor import QuantLayout
from .dropout import accumulate_dropout_grad, apply_dropout


class LoraSpec(NamedTuple):
    """The non-tensor arguments of one LoRA layer call."""

    scaling: float
    dropout_p: float
    """0 in eval mode or without dropout."""
    dropout_seed: int
    compute_dtype: torch.dtype
    """dtype of the base matmul (the LoRA branch runs in the adapter dtype)."""


FrozenWeight = QuantizedTensor | torch.Tensor
"""A frozen base weight [out, in]: 4-bit, or a dense tensor."""


def _storage(weight: FrozenWeight) -> tuple[tuple[torch.Tensor, ...], QuantLayout | None]:
    """(tensors to save for backward, layout to rebuild a QuantizedTensor; None for a dense weight)."""
    if isinstance(weight, QuantizedTensor):
        return weight.storage, weight.layout
    return (weight,), None


def _rebuild(saved: tuple[torch.Tensor, ...], layout: QuantLayout | None) -> FrozenWeight:
    return saved[0] if layout is None else QuantizedTensor.from_storage(layout, saved)


def _dense(weight: FrozenWeight, dtype: torch.dtype) -> torch.Tensor:
    """The frozen weight as a dense `dtype` tensor [out, in] (dequantized when 4-bit)."""
    if isinstance(weight, QuantizedTensor):
        return weight.dequantize(dtype)
    return weight.to(dtype)


class LoraLinearFunction(torch.autograd.Function):
    """y = x W^T + bias + s * (x * M) A^T B^T for a frozen W; see the module docstring.

    `apply(x, bias, lora_A, lora_B, spec, weight)`: x [..., in]; bias (compute dtype) or None;
    lora_A [r, in]; lora_B [out, r]; spec a LoraSpec; weight the frozen base weight, a
    QuantizedTensor or a dense tensor.
    """

    @staticmethod
    def forward(ctx, x, bias, lora_A, lora_B, spec: LoraSpec, weight: FrozenWeight):
        in_features, out_features = lora_A.shape[1], lora_B.shape[0]
        leading_shape = x.shape[:-1]
        x2 = x.reshape(-1, in_features)
        out = F.linear(x2.to(spec.compute_dtype), _dense(weight, spec.compute_dtype), bias)  # [T, out]
        xd = x2.to(lora_A.dtype)
        if spec.dropout_p > 0:
            xd = apply_dropout(xd.contiguous(), spec.dropout_p, spec.dropout_seed)
        h = (xd @ lora_A.t()).mul_(spec.scaling)  # [T, r]
        if out.dtype == lora_B.dtype:
            out.addmm_(h, lora_B.t())
        else:
            out += (h @ lora_B.t()).to(out.dtype)
        weight_tensors, ctx.weight_layout = _storage(weight)
        ctx.save_for_backward(xd, h, lora_A, lora_B, *weight_tensors)
        ctx.spec, ctx.x_dtype, ctx.has_bias = spec, x.dtype, bias is not None
        return out.reshape(*leading_shape, out_features)

    @staticmethod
    def backward(ctx, grad_out):
        xd, h, lora_A, lora_B, *weight_tensors = ctx.saved_tensors
        spec: LoraSpec = ctx.spec
        leading_shape = grad_out.shape[:-1]
        g = grad_out.reshape(-1, lora_B.shape[0])
        ga = g.to(lora_B.dtype)
        h, xd = h.to(ga.dtype), xd.to(ga.dtype)  # under autocast, forward may have produced 16-bit h
        grad_x = grad_bias = grad_A = grad_B = None
        gh = (ga @ lora_B).mul_(spec.scaling)  # [T, r]
        if ctx.needs_input_grad[2]:
            grad_A = gh.t() @ xd
        if ctx.needs_input_grad[3]:
            grad_B = ga.t() @ h
        if ctx.needs_input_grad[0]:
            weight = _dense(_rebuild(tuple(weight_tensors), ctx.weight_layout), spec.compute_dtype)
            grad_x = g.to(spec.compute_dtype) @ weight  # [T, in]
            del weight
            same_dtype = grad_x.dtype == lora_A.dtype
            if spec.dropout_p > 0:
                lora_grad = gh @ lora_A
                if same_dtype:
                    accumulate_dropout_grad(grad_x, lora_grad, spec.dropout_p, spec.dropout_seed)
                else:
                    grad_x += apply_dropout(lora_grad, spec.dropout_p, spec.dropout_seed).to(grad_x.dtype)
            elif same_dtype:
                grad_x.addmm_(gh, lora_A)
            else:
                grad_x += (gh @ lora_A).to(grad_x.dtype)
            grad_x = grad_x.to(ctx.x_dtype).reshape(*leading_shape, lora_A.shape[1])
        if ctx.has_bias and ctx.needs_input_grad[1]:
            grad_bias = g.sum(0)
        return grad_x, grad_bias, grad_A, grad_B, None, None
