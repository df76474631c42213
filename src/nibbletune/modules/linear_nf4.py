"""LinearNF4: a frozen linear layer whose weight is a 4-bit QuantizedTensor.

The layer keeps the packed codes and the (possibly double-quantized) absmax as buffers, so
`.to(device)` moves the bytes and nothing is ever re-quantized. Its state dict holds the
bitsandbytes keys (`weight`, `weight.absmax`, `weight.quant_map`, ...), so the state dict of a
model built from these layers is a transformers + bitsandbytes 4-bit checkpoint.

Autograd
--------
For y = x W^T + b, with x of shape [..., in] and W of shape [out, in] (frozen):

    dL/dx = dL/dy @ W            (shape [..., in])
    dL/db = sum over all leading dims of dL/dy
    dL/dW is not needed: W is frozen, so backward returns None for it.

`_NF4LinearFunction` saves only the packed codes and absmax through `save_for_backward` (about
a quarter of a bf16 weight) and dequantizes W a second time in backward instead of keeping the
dequantized copy alive between forward and backward. Saving through `save_for_backward`
(rather than stashing tensors on ctx) is what keeps gradients right under activation
checkpointing and offloading.

torch.compile
-------------
The dequantization is the custom op `nibbletune::dequantize_4bit` with a fake (meta)
implementation, so Dynamo sees one opaque op with a known output shape and dtype instead of
tracing into (or breaking on) the kernel dispatch in `nibbletune.quant.dequantize`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import FormatError
from ..quant import QuantizedTensor, from_bnb_state_dict, quantize, to_bnb_state_dict
from ..quant.bnb_format import bnb_state_keys, is_bnb_quantized

COMPUTE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _dequantize_packed(packed, absmax, nested_absmax, nested_offset, shape, blocksize, quant_type, dtype):
    qt = QuantizedTensor(
        packed, absmax, torch.Size(shape), dtype, blocksize, quant_type,
        nested_absmax, nested_offset if nested_absmax is not None else None,
    )
    return qt.dequantize(dtype)


@torch.library.custom_op("nibbletune::dequantize_4bit", mutates_args=())
def dequantize_4bit_op(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    nested_absmax: torch.Tensor | None,
    nested_offset: float,
    shape: list[int],
    blocksize: int,
    quant_type: str,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Dequantize 4-bit codes to a new tensor of `shape` and `dtype` (opaque to torch.compile)."""
    return _dequantize_packed(packed, absmax, nested_absmax, nested_offset, shape, blocksize, quant_type, dtype)


@dequantize_4bit_op.register_fake
def _dequantize_4bit_fake(packed, absmax, nested_absmax, nested_offset, shape, blocksize, quant_type, dtype):
    return packed.new_empty(shape, dtype=dtype)


def _dequantize_saved(packed, absmax, nested_absmax, meta: tuple) -> torch.Tensor:
    nested_offset, shape, blocksize, quant_type, dtype = meta
    if torch.compiler.is_compiling():
        return dequantize_4bit_op(packed, absmax, nested_absmax, nested_offset, shape, blocksize, quant_type, dtype)
    # Eager: the op's body without its dispatch, which costs about 70 us a call on a CPU.
    return _dequantize_packed(packed, absmax, nested_absmax, nested_offset, shape, blocksize, quant_type, dtype)


class _NF4LinearFunction(torch.autograd.Function):
    """y = x @ dequant(W)^T + b with W frozen; see the module docstring for the gradients."""

    @staticmethod
    def forward(ctx, x, packed, absmax, nested_absmax, bias, meta):
        weight = _dequantize_saved(packed, absmax, nested_absmax, meta)  # [out, in], compute dtype
        ctx.save_for_backward(packed, absmax, nested_absmax)
        ctx.meta = meta
        ctx.has_bias = bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        packed, absmax, nested_absmax = ctx.saved_tensors
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            weight = _dequantize_saved(packed, absmax, nested_absmax, ctx.meta)
            grad_x = grad_out @ weight  # [..., out] @ [out, in] -> [..., in]
        if ctx.has_bias and ctx.needs_input_grad[4]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        return grad_x, None, None, None, grad_bias, None


class LinearNF4(nn.Module):
    """A linear layer with a frozen 4-bit weight: y = x @ dequant(W)^T + b in `compute_dtype`.

    The input is cast to `compute_dtype`; the output is in `compute_dtype`. The bias (if any)
    keeps its own dtype and is cast per call, never in place.
    """

    def __init__(self, weight: QuantizedTensor, bias: torch.Tensor | None = None, compute_dtype: torch.dtype = torch.float32):
        super().__init__()
        if len(weight.shape) != 2:
            raise FormatError(f"LinearNF4 needs a 2-D weight, got shape {tuple(weight.shape)}")
        if compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype must be float32, float16 or bfloat16, got {compute_dtype}")
        self.out_features, self.in_features = int(weight.shape[0]), int(weight.shape[1])
        self.compute_dtype = compute_dtype
        self._set_weight(weight)
        if bias is not None:
            if bias.shape != (self.out_features,):
                raise FormatError(f"bias has shape {tuple(bias.shape)}, expected ({self.out_features},)")
            self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    def _set_weight(self, qt: QuantizedTensor) -> None:
        # Non-persistent buffers: `.to()` moves them; the state dict entries are written by hand.
        self.register_buffer("packed_codes", qt.packed, persistent=False)
        self.register_buffer("absmax", qt.absmax, persistent=False)
        self.register_buffer("nested_absmax", qt.nested_absmax, persistent=False)
        self.nested_offset = qt.nested_offset
        self.weight_dtype = qt.dtype
        self.blocksize = qt.blocksize
        self.quant_type = qt.quant_type

    @property
    def quantized_weight(self) -> QuantizedTensor:
        """The frozen weight as a QuantizedTensor sharing this layer's buffers."""
        return QuantizedTensor(
            self.packed_codes, self.absmax, torch.Size((self.out_features, self.in_features)),
            self.weight_dtype, self.blocksize, self.quant_type, self.nested_absmax, self.nested_offset,
        )

    @property
    def weight(self) -> QuantizedTensor:
        """Alias of `quantized_weight`, for code that reads `module.weight.shape`/`.device`."""
        return self.quantized_weight

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        quant_type: str = "nf4",
        blocksize: int = 64,
        double_quant: bool = True,
        compute_dtype: torch.dtype | None = None,
    ) -> LinearNF4:
        """Quantize an nn.Linear's weight; compute_dtype defaults to the linear's weight dtype."""
        weight = linear.weight.detach()
        qt = quantize(weight, quant_type, blocksize, double_quant)
        if compute_dtype is None:
            compute_dtype = weight.dtype if weight.dtype in COMPUTE_DTYPES else torch.float32
        return cls(qt, linear.bias, compute_dtype)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight decoded to `dtype` (default: compute dtype), shape [out, in], no autograd."""
        return _dequantize_saved(self.packed_codes, self.absmax, self.nested_absmax, self._meta(dtype))

    def _meta(self, dtype: torch.dtype | None = None) -> tuple:
        offset = float(self.nested_offset) if self.nested_offset is not None else 0.0
        shape = [self.out_features, self.in_features]
        return (offset, shape, self.blocksize, self.quant_type, dtype or self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.compute_dtype)
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        return _NF4LinearFunction.apply(x, self.packed_codes, self.absmax, self.nested_absmax, bias, self._meta())

    def _apply(self, fn, recurse=True):
        """Let `.to()`, `.cuda()`, `.half()` ... move the 4-bit buffers but never cast them.

        nn.Module would apply a dtype cast to every floating buffer, which would round the float32
        absmax / nested_absmax; only the bias follows dtype casts.
        """
        names = ("packed_codes", "absmax", "nested_absmax")
        quantized = {name: self._buffers.pop(name) for name in names}
        try:
            super()._apply(fn, recurse)
        finally:
            device = fn(torch.empty(0, device=quantized["packed_codes"].device)).device
            for name in names:
                value = quantized[name]
                self._buffers[name] = None if value is None else value.to(device)
                self._non_persistent_buffers_set.add(name)
        return self

    # -- state dict: the bitsandbytes layout ------------------------------------------------------

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)  # bias only (buffers are non-persistent)
        for key, value in to_bnb_state_dict(self.quantized_weight, prefix + "weight").items():
            destination[key] = value if keep_vars else value.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        weight_prefix = prefix + "weight"
        weight_keys = set(bnb_state_keys(weight_prefix, state_dict))
        if is_bnb_quantized(state_dict, weight_prefix):
            qt = from_bnb_state_dict(state_dict, weight_prefix)
            expected = (self.out_features, self.in_features)
            if tuple(qt.shape) != expected:
                raise FormatError(f"{weight_prefix}: checkpoint shape {tuple(qt.shape)}, layer expects {expected}")
            self._set_weight(qt.to(self.packed_codes.device))
        elif weight_prefix in state_dict:
            error_msgs.append(f"{weight_prefix}: not a 4-bit weight (no quant_state entry); quantize it first")
        else:
            missing_keys.append(weight_prefix)
        rest = {k: v for k, v in state_dict.items() if k not in weight_keys}
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        dq = ", double_quant" if self.nested_absmax is not None else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"{self.quant_type}, blocksize={self.blocksize}{dq}, compute_dtype={self.compute_dtype}"
        )
