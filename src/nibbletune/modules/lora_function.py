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
is accumulated into g @ W in one pass (`accumulate_dropout_grad` / addmm_). Saved for backward: the packed
4-bit weight (or the frozen dense weight), A, B, xd and h, which is what autograd would keep.

The branch runs in the adapter dtype on x cast to it and is cast to the base output's dtype
before the sum, as PEFT does; the base runs in its compute dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .dropout import accumulate_dropout_grad, apply_dropout
from .linear_nf4 import _dequantize_saved


def _base_weight(weight_or_packed, absmax, nested_absmax, meta) -> torch.Tensor:
    if meta is None:
        return weight_or_packed
    return _dequantize_saved(weight_or_packed, absmax, nested_absmax, meta)


class LoraLinearFunction(torch.autograd.Function):
    """y = x W^T + bias + s * (x * M) A^T B^T for a frozen W; see the module docstring.

    Arguments of `apply`: x [..., in]; bias (compute dtype) or None; lora_A [r, in]; lora_B
    [out, r]; spec = (scaling, dropout_p, dropout_seed, compute_dtype, quant_meta); then either
    the dense frozen weight and two Nones (quant_meta None) or the packed codes, absmax and
    nested absmax of a LinearNF4 (quant_meta its `_meta()`).
    """

    @staticmethod
    def forward(ctx, x, bias, lora_A, lora_B, spec, weight_or_packed, absmax, nested_absmax):
        scaling, dropout_p, seed, compute_dtype, meta = spec
        in_features, out_features = lora_A.shape[1], lora_B.shape[0]
        leading_shape = x.shape[:-1]
        x2 = x.reshape(-1, in_features)
        weight = _base_weight(weight_or_packed, absmax, nested_absmax, meta)
        out = F.linear(x2.to(compute_dtype), weight.to(compute_dtype), bias)  # [T, out]
        del weight
        xd = x2.to(lora_A.dtype)
        if dropout_p > 0:
            xd = apply_dropout(xd.contiguous(), dropout_p, seed)
        h = (xd @ lora_A.t()).mul_(scaling)  # [T, r]
        if out.dtype == lora_B.dtype:
            out.addmm_(h, lora_B.t())
        else:
            out += (h @ lora_B.t()).to(out.dtype)
        ctx.save_for_backward(xd, h, lora_A, lora_B, weight_or_packed, absmax, nested_absmax)
        ctx.spec, ctx.x_dtype, ctx.has_bias = spec, x.dtype, bias is not None
        return out.reshape(*leading_shape, out_features)

    @staticmethod
    def backward(ctx, grad_out):
        xd, h, lora_A, lora_B, weight_or_packed, absmax, nested_absmax = ctx.saved_tensors
        scaling, dropout_p, seed, compute_dtype, meta = ctx.spec
        leading_shape = grad_out.shape[:-1]
        g = grad_out.reshape(-1, lora_B.shape[0])
        ga = g.to(lora_B.dtype)
        h, xd = h.to(ga.dtype), xd.to(ga.dtype)  # under autocast, forward may have produced 16-bit h
        grad_x = grad_bias = grad_A = grad_B = None
        gh = (ga @ lora_B).mul_(scaling)  # [T, r]
        if ctx.needs_input_grad[2]:
            grad_A = gh.t() @ xd
        if ctx.needs_input_grad[3]:
            grad_B = ga.t() @ h
        if ctx.needs_input_grad[0]:
            weight = _base_weight(weight_or_packed, absmax, nested_absmax, meta).to(compute_dtype)
            grad_x = g.to(compute_dtype) @ weight  # [T, in]
            del weight
            same_dtype = grad_x.dtype == lora_A.dtype
            if dropout_p > 0:
                lora_grad = gh @ lora_A
                if same_dtype:
                    accumulate_dropout_grad(grad_x, lora_grad, dropout_p, seed)
                else:
                    grad_x += apply_dropout(lora_grad, dropout_p, seed).to(grad_x.dtype)
            elif same_dtype:
                grad_x.addmm_(gh, lora_A)
            else:
                grad_x += (gh @ lora_A).to(grad_x.dtype)
            grad_x = grad_x.to(ctx.x_dtype).reshape(*leading_shape, lora_A.shape[1])
        if ctx.has_bias and ctx.needs_input_grad[1]:
            grad_bias = g.sum(0)
        return grad_x, grad_bias, grad_A, grad_B, None, None, None, None
