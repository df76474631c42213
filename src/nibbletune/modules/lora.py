"""LoraLinear: a frozen base linear (LinearNF4 or nn.Linear) plus a trainable low-rank update.

Names and numerics follow PEFT so adapters move between the two unchanged:

    y = base(x) + lora_B(lora_A(dropout(x))) * scaling,    scaling = alpha / r  (alpha / sqrt(r) with rsLoRA)

The LoRA branch runs in the adapter dtype (float32 by default) on the input cast to that
dtype, and its output is cast to the base output's dtype before the sum, as PEFT does.

In eager mode a plain LoRA layer runs as one autograd op, `LoraLinearFunction`
(`lora_function.py`, which derives the gradients); dropout is the hashed dropout of
`dropout.py` (a mask recomputed from a per-call seed). Under torch.compile the same formulas run
as two custom ops (`lora_op.py`), opaque to the compiler. DoRA takes the composable path below:
nn.Linear calls and plain autograd, with nn.Dropout under torch.compile.

DoRA (use_dora=True) re-scales each output row of W' = W + scaling * B A to a learned length m
(`lora_magnitude_vector`, shape [out]). With n = ||W'||_row computed from a detached B A and
itself detached (DoRA paper, section 4.3, and PEFT's `DoraLinearLayer`):

    y = base(x) + (m / n - 1) * (x W^T) + (m / n) * scaling * B A x

which equals x (m / n * W')^T + bias. Without dropout, x W^T is the base output minus its bias;
with dropout active it is recomputed on dropout(x), again exactly like PEFT.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import NibbletuneError
from ..quant import QuantSettings
from .dropout import apply_dropout, draw_seed
from .linear_nf4 import LinearNF4, linear_4bit
from .loftq import loftq_init
from .lora_function import LoraLinearFunction, LoraSpec
from .lora_op import lora_linear
from .lora_settings import INITS, lora_scaling


def _base_weight(base: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    if isinstance(base, LinearNF4):
        return base.dequantized_weight(dtype)
    return base.weight.detach().to(dtype)


class LoraLinear(nn.Module):
    """A frozen `base` (LinearNF4 or nn.Linear) with LoRA children `lora_A`, `lora_B` (PEFT names).

    init: "default" (PEFT: A kaiming-uniform with a=sqrt(5), B zeros), "gaussian" (A normal with
    std 1/r, B zeros) or "loftq" (needs an nn.Linear base holding the full-precision weight,
    which is replaced by a LinearNF4 quantized with `quant` (default QuantSettings(), computing
    in the linear's dtype when its compute dtype is auto), `loftq_iters` rounds; see `loftq.py`).
    dtype: dtype of the adapter parameters (float32 by default).
    """

    def __init__(
        self,
        base: nn.Module,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        use_dora: bool = False,
        init: str = "default",
        dtype: torch.dtype = torch.float32,
        quant: QuantSettings | None = None,
        loftq_iters: int = 1,
    ):
        super().__init__()
        if not isinstance(base, (LinearNF4, nn.Linear)):
            raise NibbletuneError(f"LoraLinear wraps LinearNF4 or nn.Linear, got {type(base).__name__}")
        if int(r) != r or r <= 0:
            raise NibbletuneError(f"LoRA rank r must be a positive integer, got {r!r}")
        if init not in INITS:
            raise NibbletuneError(f"LoRA init must be one of {INITS}, got {init!r}")
        if not 0.0 <= dropout < 1.0:
            raise NibbletuneError(f"LoRA dropout must be in [0, 1), got {dropout}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.alpha, self.use_rslora, self.use_dora, self.init = int(r), alpha, use_rslora, use_dora, init
        self.scaling = lora_scaling(self.r, alpha, use_rslora)
        device = base.weight.device  # a LinearNF4's weight is its QuantizedTensor
        for p in base.parameters():
            p.requires_grad_(False)
        self.base = base
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(self.in_features, self.r, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(self.r, self.out_features, bias=False, device=device, dtype=dtype)
        self.reset_lora_parameters(quant, loftq_iters)
        if use_dora:
            self.lora_magnitude_vector = nn.Parameter(self._weight_norm(dtype))
        else:
            self.register_parameter("lora_magnitude_vector", None)

    def reset_lora_parameters(self, quant: QuantSettings | None = None, loftq_iters: int = 1) -> None:
        """Initialise lora_A / lora_B according to `self.init` (for LoftQ, also the base weight)."""
        if self.init == "loftq":
            if not isinstance(self.base, nn.Linear):
                raise NibbletuneError(
                    "init='loftq' needs the full-precision weight: wrap the nn.Linear before quantizing "
                    "(the 4-bit base of a LinearNF4 has already lost what LoftQ would recover)"
                )
            quant = quant or QuantSettings()
            qt, lora_A, lora_B = loftq_init(self.base.weight.detach(), self.r, self.scaling, quant, loftq_iters)
            compute_dtype = self.base.weight.dtype if quant.compute_dtype == "auto" else quant.torch_compute_dtype()
            self.base = LinearNF4(qt, self.base.bias, compute_dtype)
            with torch.no_grad():
                self.lora_A.weight.copy_(lora_A)
                self.lora_B.weight.copy_(lora_B)
            return
        if self.init == "gaussian":
            nn.init.normal_(self.lora_A.weight, std=1 / self.r)
        else:
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def delta_weight(self) -> torch.Tensor:
        """scaling * B @ A in the adapter dtype, shape [out, in] (differentiable)."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def _weight_norm(self, dtype: torch.dtype) -> torch.Tensor:
        """Row norms of W + scaling * B A, with nothing attached to the graph (PEFT detaches it)."""
        with torch.no_grad():
            weight = _base_weight(self.base, dtype) + self.delta_weight().to(dtype)
            return torch.linalg.norm(weight, dim=1).to(dtype)

    def merged_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The effective weight (dequantized base + LoRA, DoRA-rescaled) in float32, cast to `dtype`.

        A pure function of the current weights: the base stays as it is and nothing is re-quantized.
        """
        with torch.no_grad():
            weight = _base_weight(self.base, torch.float32) + self.delta_weight().float()
            if self.use_dora:
                norm = torch.linalg.norm(weight, dim=1)
                weight = (self.lora_magnitude_vector.float() / norm).unsqueeze(1) * weight
            return weight.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.use_dora:
            return self._fused_forward(x)
        base_in = x.to(self.base.weight.dtype) if isinstance(self.base, nn.Linear) else x
        result = self.base(base_in)
        adapter_dtype = self.lora_A.weight.dtype
        x = x.to(adapter_dtype)
        if not self.use_dora:
            lora_out = self.lora_B(self.lora_A(self._dropout(x))) * self.scaling
            return result + lora_out.to(result.dtype)
        return (result + self._dora_term(x, result)).to(result.dtype)  # PEFT adds in float32, then casts

    def _dropout_p(self) -> float:
        return self.lora_dropout.p if self.training and isinstance(self.lora_dropout, nn.Dropout) else 0.0

    def _dropout(self, x: torch.Tensor) -> torch.Tensor:
        """Hashed dropout (`dropout.py`) in eager mode; nn.Dropout when torch.compile traces."""
        p = self._dropout_p()
        if p == 0.0:
            return x
        if torch.compiler.is_compiling():
            return self.lora_dropout(x)
        return apply_dropout(x.contiguous(), p, draw_seed())

    def _fused_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The whole layer as one autograd op (`lora_function.py`), or as custom ops under torch.compile."""
        p = self._dropout_p()
        base = self.base
        four_bit = isinstance(base, LinearNF4)
        compute_dtype = base.compute_dtype if four_bit else base.weight.dtype
        bias = None if base.bias is None else base.bias.to(compute_dtype)
        if torch.compiler.is_compiling():  # the seed as a tensor: an int would be a constant of the graph
            seed = (torch.randint(-(1 << 63), (1 << 63) - 1, (), dtype=torch.int64) if p > 0
                    else torch.zeros((), dtype=torch.int64))
            return lora_linear(x, bias, self.lora_A.weight, self.lora_B.weight,
                               LoraSpec(self.scaling, p, 0, compute_dtype), base, seed)
        spec = LoraSpec(self.scaling, p, draw_seed() if p > 0 else 0, compute_dtype)
        weight = base.quantized_weight if four_bit else base.weight
        return LoraLinearFunction.apply(x, bias, self.lora_A.weight, self.lora_B.weight, spec, weight)

    def _dora_term(self, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """(m / n - 1) * x W^T + (m / n) * scaling * B A x, as in PEFT's DoraLinearLayer.forward."""
        norm = self._weight_norm(x.dtype)  # detached, as PEFT does
        mag_norm_scale = (self.lora_magnitude_vector / norm).view(1, -1)
        if self._dropout_p() == 0.0:
            base_result = result if self.base.bias is None else result - self.base.bias.to(result.dtype)
        else:
            x = self._dropout(x)
            base_result = self._base_matmul(x)
        lora_result = self.lora_B(self.lora_A(x))
        return (mag_norm_scale - 1) * base_result + mag_norm_scale * lora_result * self.scaling

    def _base_matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x @ W^T without bias, in x's dtype (the dropout branch of DoRA)."""
        if isinstance(self.base, nn.Linear):
            return F.linear(x, self.base.weight.detach().to(x.dtype))
        return linear_4bit(x, self.base.quantized_weight, None, x.dtype)

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """The trainable tensors under their PEFT-relative names."""
        state = {"lora_A.weight": self.lora_A.weight, "lora_B.weight": self.lora_B.weight}
        if self.use_dora:
            state["lora_magnitude_vector"] = self.lora_magnitude_vector
        return state

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}, dora={self.use_dora}, rslora={self.use_rslora}"
