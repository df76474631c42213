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
`QuantizedTensor.dequantize` is the custom op `nibbletune::dequantize_4bit` while Dynamo traces
(see `quant/tensor.py`), so a compiled model sees one opaque op per weight.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import FormatError
from ..quant import QuantizedTensor, QuantSettings, from_bnb_state_dict, quantize, to_bnb_state_dict
from ..quant.bnb_format import bnb_state_keys, is_bnb_quantized
from ..quant.scratch import dequantize_scratch
from ..quant.tensor import QuantLayout, dequantize_4bit_op

COMPUTE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class _NF4LinearFunction(torch.autograd.Function):
    """y = x @ dequant(W)^T + b with W frozen; see the module docstring for the gradients.

    `apply(x, bias, compute_dtype, layout, offset, *storage)`: the weight as its storage tensors
    and layout; `offset` is the double-quant offset as a 0-d tensor, or None to take the layout's
    float (see `_decode`). The storage is saved for backward and the dequantized copy is not.
    """

    @staticmethod
    def forward(ctx, x, bias, compute_dtype, layout: QuantLayout, offset, *storage):
        ctx.save_for_backward(offset, *storage)
        ctx.layout, ctx.compute_dtype, ctx.has_bias = layout, compute_dtype, bias is not None
        return F.linear(x, _decode(storage, layout, offset, compute_dtype), bias)  # dequantized: [out, in]

    @staticmethod
    def backward(ctx, grad_out):
        offset, *storage = ctx.saved_tensors
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:  # [..., out] @ [out, in] -> [..., in]
            grad_x = grad_out @ _decode(storage, ctx.layout, offset, ctx.compute_dtype)
        if ctx.has_bias and ctx.needs_input_grad[1]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        return (grad_x, grad_bias, None, None, None, *[None] * len(storage))


def _decode(storage, layout: QuantLayout, offset: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """The weight in `dtype`: the scratch buffer eagerly; under torch.compile the custom op, fed the
    offset tensor when there is one (a QuantizedTensor built while Dynamo traces would make it read
    the layout's float, which it bakes into the graph: one graph per layer)."""
    if offset is not None and torch.compiler.is_compiling():
        nested_absmax = storage[2] if len(storage) > 2 else None
        return dequantize_4bit_op(storage[0], storage[1], nested_absmax, offset, list(layout.shape),
                                  layout.blocksize, layout.quant_type, dtype)
    return dequantize_scratch(QuantizedTensor.from_storage(layout, tuple(storage)), dtype)


def linear_4bit(x: torch.Tensor, weight: QuantizedTensor, bias: torch.Tensor | None,
                compute_dtype: torch.dtype) -> torch.Tensor:
    """x @ dequant(weight)^T + bias in `compute_dtype`, differentiable in x and bias (the weight is frozen)."""
    return _NF4LinearFunction.apply(x, bias, compute_dtype, weight.layout, None, *weight.storage)


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
        self._layout: QuantLayout = qt.layout
        # A plain attribute, not a buffer: it stays on the CPU and outside the state dict.
        self._nested_offset = None if qt.nested_offset is None else torch.tensor(qt.nested_offset, dtype=torch.float64)

    def _storage(self) -> tuple[torch.Tensor, ...]:
        if self.nested_absmax is None:
            return (self.packed_codes, self.absmax)
        return (self.packed_codes, self.absmax, self.nested_absmax)

    @property
    def quantized_weight(self) -> QuantizedTensor:
        """The frozen weight as a QuantizedTensor sharing this layer's buffers."""
        return QuantizedTensor.from_storage(self._layout, self._storage())

    def traceable_weight(self) -> tuple[list[torch.Tensor], QuantLayout, torch.Tensor | None]:
        """(storage tensors, layout, double-quant offset as a 0-d float64 CPU tensor or None), for torch.compile.

        The offset differs per weight; read as the layout's float, Dynamo would bake it into the
        graph and compile every layer anew. As a tensor it is an input of one shared graph.
        """
        return list(self._storage()), self._layout, self._nested_offset

    @property
    def quant_type(self) -> str:
        """The 4-bit code book: "nf4" or "fp4"."""
        return self._layout.quant_type

    @property
    def blocksize(self) -> int:
        """Weights per absmax block."""
        return self._layout.blocksize

    @property
    def weight(self) -> QuantizedTensor:
        """Alias of `quantized_weight`, for code that reads `module.weight.shape`/`.device`."""
        return self.quantized_weight

    @classmethod
    def from_linear(cls, linear: nn.Linear, settings: QuantSettings | None = None,
                    compute_dtype: torch.dtype | None = None) -> LinearNF4:
        """Quantize an nn.Linear's weight with `settings` (default QuantSettings()).

        compute_dtype: the torch dtype to compute in; by default the settings' compute dtype, and
        for "auto" the linear's own weight dtype.
        """
        settings = settings or QuantSettings()
        weight = linear.weight.detach()
        qt = quantize(weight, settings.quant_type, settings.blocksize, settings.double_quant)
        if compute_dtype is None:
            if settings.compute_dtype != "auto":
                compute_dtype = settings.torch_compute_dtype()
            else:
                compute_dtype = weight.dtype if weight.dtype in COMPUTE_DTYPES else torch.float32
        return cls(qt, linear.bias, compute_dtype)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight decoded to `dtype` (default: compute dtype), shape [out, in], no autograd."""
        return self.quantized_weight.dequantize(dtype or self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.compute_dtype)
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        return _NF4LinearFunction.apply(x, bias, self.compute_dtype, self._layout, self._nested_offset, *self._storage())

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
