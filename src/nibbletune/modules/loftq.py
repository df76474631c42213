"""LoftQ initialisation: choose the 4-bit base and the LoRA factors together.

Plain QLoRA starts from Q(W) with B = 0, so the model begins with the full quantization error
W - Q(W). LoftQ (Li et al. 2023) alternates, starting from B A = 0:

    Q_k       = dequant(quantize(W - scaling * B_{k-1} A_{k-1}))
    B_k, A_k  = rank-r factors with scaling * B_k A_k ~= W - Q_k   (truncated SVD)

so after each round Q_k + scaling * B_k A_k is closer to W than Q(W) alone (the first round
already is: the SVD captures the best rank-r part of the quantization error). The returned base
is the quantized tensor from the last round, whose B A was fitted to it.

Unlike PEFT's `loftq_init` (CUDA-only, and fitting B A to the residual with no regard to
lora_alpha / r), this runs wherever `quantize` runs and honours the scale: the SVD factors
U sqrt(S) and sqrt(S) V^T are divided by sqrt(scaling) so that scaling * B A is the fitted
residual, whatever alpha and r are.

`LoftQBase` applies it while a model is loaded (`load_model(..., quantize_weight=...)`), the
only moment the full-precision weights exist: each targeted linear stores Q of the residual
and keeps its factors, which `LoftQBase.apply` copies into the LoRA layers once they exist.
With one round (PEFT's default) that base is plain Q(W); with more it is Q(W - scaling B A),
and the adapter belongs to that base only: `LOFTQ_NOTE` (loftq.json) says which, in its directory.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import NibbletuneError
from ..quant import QuantizedTensor, quantize


def low_rank_factors(residual: torch.Tensor, r: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [r, in], B [out, r]) with scaling * B @ A the best rank-r approximation of `residual`."""
    U, S, Vh = torch.linalg.svd(residual, full_matrices=False)
    root = S[:r].sqrt() / scaling ** 0.5
    B = U[:, :r] * root  # [out, r]
    A = root[:, None] * Vh[:r]  # [r, in]
    return A, B


def loftq_init(
    weight: torch.Tensor,
    r: int,
    scaling: float,
    num_iters: int = 1,
    quant_type: str = "nf4",
    blocksize: int = 64,
    double_quant: bool = True,
) -> tuple[QuantizedTensor, torch.Tensor, torch.Tensor]:
    """Return (quantized base, lora_A [r, in], lora_B [out, r]) for a [out, in] weight.

    The factors are float32; the quantized tensor keeps the weight's dtype as its nominal dtype.
    """
    if weight.dim() != 2:
        raise NibbletuneError(f"LoftQ needs a 2-D weight, got shape {tuple(weight.shape)}")
    if num_iters < 1:
        raise NibbletuneError(f"LoftQ num_iters must be at least 1, got {num_iters}")
    if r > min(weight.shape):
        raise NibbletuneError(f"LoftQ rank {r} exceeds the weight's smallest dimension {min(weight.shape)}")
    full = weight.detach().float()
    target = full
    for _ in range(num_iters):
        qt = quantize(target.to(weight.dtype), quant_type, blocksize, double_quant)
        dequantized = qt.dequantize(torch.float32)
        lora_A, lora_B = low_rank_factors(full - dequantized, r, scaling)
        target = full - scaling * (lora_B @ lora_A)
    return qt, lora_A.contiguous(), lora_B.contiguous()


LOFTQ_NOTE = "loftq.json"
_ONE_ROUND_NOTE = (
    "LoftQ adapter, 1 round: the base it was trained on is the plain 4-bit Q(W) with these quant settings "
    "(B0 A0 fitted W - Q(W)), so it works on any base quantized that way, PEFT + bitsandbytes included.")
_ROUNDS_NOTE = (
    "LoftQ adapter, several rounds: it was trained on the base Q(W - scaling * B0 A0), not on Q(W). Rebuild that "
    "base with nibbletune.loading.load_model(..., quantize_weight=nibbletune.modules.loftq.LoftQBase(settings, "
    "LoftQSettings(num_iters, quant_type, blocksize, double_quant as here))) from the same full-precision "
    "checkpoint; on a plain 4-bit base (PEFT + bitsandbytes, or a merge from Q(W)) it gives other outputs.")


class LoftQBase:
    """LoftQ for the linears `settings.target_modules` selects, computed while `load_model` streams them.

    Use as `load_model(path, ..., quantize_weight=loftq)` (quant settings equal to `loftq_settings`),
    then `apply_lora(model, settings with init="default")` and `loftq.apply(model)`. Deterministic
    for a given checkpoint, so loading again with a new `LoftQBase` rebuilds the same base (which
    is how a LoftQ adapter is used after training: merge, generate, resume).
    """

    def __init__(self, settings, loftq_settings):
        from .lora import lora_scaling

        self.settings, self.loftq_settings = settings, loftq_settings
        self.scaling = lora_scaling(settings.r, settings.alpha, settings.use_rslora)
        self.factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._targets: set[str] | None = None

    def __call__(self, model: torch.nn.Module, name: str, weight: torch.Tensor) -> QuantizedTensor | None:
        """The LoftQ-quantized residual for a targeted linear's [out, in] weight; None for the others."""
        if self._targets is None:
            from .inject import resolve_targets

            self._targets = set(resolve_targets(model, self.settings.target_modules))
        if name not in self._targets:
            return None
        loftq = self.loftq_settings
        qt, lora_A, lora_B = loftq_init(weight, self.settings.r, self.scaling, loftq.num_iters, loftq.quant_type,
                                        loftq.blocksize, loftq.double_quant)
        self.factors[name] = (lora_A, lora_B)
        return qt

    def apply(self, model: torch.nn.Module) -> list[str]:
        """Copy the factors into the LoRA layers (and refit DoRA magnitudes); returns the module paths."""
        from .inject import lora_layers

        layers = lora_layers(model)
        missing = sorted(set(self.factors) - set(layers)) or sorted(set(layers) - set(self.factors))
        if missing:
            raise NibbletuneError(f"LoftQ: module '{missing[0]}' has LoftQ factors or a LoRA layer, not both")
        with torch.no_grad():
            for name, (lora_A, lora_B) in self.factors.items():
                layer = layers[name]
                layer.lora_A.weight.copy_(lora_A)
                layer.lora_B.weight.copy_(lora_B)
                if layer.lora_magnitude_vector is not None:  # DoRA: magnitude of the new base + B A
                    layer.lora_magnitude_vector.copy_(layer._weight_norm(torch.float32))
        return sorted(self.factors)

    def note(self) -> dict:
        """The `loftq.json` written beside an adapter trained from this base."""
        loftq = self.loftq_settings
        return {
            "format": 1, "init": "loftq", "num_iters": loftq.num_iters, "quant_type": loftq.quant_type,
            "blocksize": loftq.blocksize, "double_quant": loftq.double_quant,
            "base_is_plain_quantization": loftq.num_iters == 1,
            "note": _ONE_ROUND_NOTE if loftq.num_iters == 1 else _ROUNDS_NOTE,
        }


def read_loftq_note(adapter_dir) -> dict | None:
    """The `loftq.json` of an adapter directory, or None for an adapter not initialised with LoftQ."""
    path = Path(adapter_dir) / LOFTQ_NOTE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise NibbletuneError(f"{path}: cannot read ({exc})") from None
