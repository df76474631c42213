"""LoftQBase: LoftQ computed while `load_model` streams the full-precision weights in.

The full-precision weights exist only while the model loads, so LoftQ has to happen then:
`load_model(path, quant, quantize_weight=LoftQBase(lora, quant))` stores, for each targeted
linear, the quantized residual of `loftq.loftq_init` instead of Q(W) and keeps its factors;
`apply_lora(model, lora)` with init "default" then adds the adapters and `LoftQBase.apply(model)`
copies the factors in. Deterministic for a given checkpoint, so loading again with a new
LoftQBase rebuilds the same base (how a LoftQ adapter is used after training: merge, generate,
resume).
"""

from __future__ import annotations

import torch

from ..errors import NibbletuneError
from ..quant import QuantizedTensor, QuantSettings
from .inject import lora_layers, resolve_targets
from .loftq import loftq_init, loftq_note
from .lora_settings import LoraSettings


class LoftQBase:
    """LoftQ for the linears `lora.target_modules` selects, with `lora.loftq_iters` rounds and `quant`'s format."""

    def __init__(self, lora: LoraSettings, quant: QuantSettings):
        self.lora, self.quant = lora, quant
        self.factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._targets: set[str] | None = None

    def __call__(self, model: torch.nn.Module, name: str, weight: torch.Tensor) -> QuantizedTensor | None:
        """The LoftQ-quantized residual for a targeted linear's [out, in] weight; None for the others."""
        if self._targets is None:
            self._targets = set(resolve_targets(model, self.lora.target_modules))
        if name not in self._targets:
            return None
        qt, lora_A, lora_B = loftq_init(weight, self.lora.r, self.lora.scaling, self.quant, self.lora.loftq_iters)
        self.factors[name] = (lora_A, lora_B)
        return qt

    def apply(self, model: torch.nn.Module) -> list[str]:
        """Copy the factors into the LoRA layers (and refit DoRA magnitudes); returns the module paths."""
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
        return loftq_note(self.quant, self.lora.loftq_iters)
