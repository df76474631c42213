"""Oracles shared by the layer tests: bitsandbytes Linear4bit + PEFT, and a pure-torch reference."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from nibbletune.modules import LinearNF4, LoraLinear
from nibbletune.quant import QuantSettings, to_bnb_state_dict
from nibbletune.quant.reference import reference_dequantize_4bit


def reference_weight(layer: LinearNF4) -> torch.Tensor:
    """The float32 weight of a LinearNF4 decoded by the slow reference (not the production path)."""
    qt = layer.quantized_weight
    absmax = qt.absmax_float32()
    return reference_dequantize_4bit(qt.packed, absmax, qt.shape, torch.float32, qt.quant_type, qt.blocksize)


def make_nf4(out_features: int, in_features: int, bias: bool = True, compute_dtype=torch.float32, seed: int = 0,
             double_quant: bool = True) -> LinearNF4:
    """A LinearNF4 quantized from a seeded float32 nn.Linear."""
    torch.manual_seed(seed)
    linear = nn.Linear(in_features, out_features, bias=bias)
    return LinearNF4.from_linear(linear, QuantSettings(double_quant=double_quant), compute_dtype=compute_dtype)


def randomize_adapter(layer: LoraLinear, seed: int = 1) -> None:
    """Give lora_B (and the DoRA magnitude) non-zero values so every gradient is exercised."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.lora_A.weight.copy_(torch.randn(layer.lora_A.weight.shape, generator=gen) * 0.1)
        layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=gen) * 0.1)
        if layer.use_dora:
            layer.lora_magnitude_vector.mul_(1 + 0.1 * torch.randn(layer.out_features, generator=gen))


class _Holder(nn.Module):
    def __init__(self, proj: nn.Module):
        super().__init__()
        self.proj = proj
        self.is_loaded_in_4bit = True  # makes PEFT pick its bitsandbytes Linear4bit LoRA layer

    def forward(self, x):
        return self.proj(x)


def bnb_linear4bit(layer: LinearNF4):
    """A bitsandbytes Linear4bit holding exactly `layer`'s packed weights and bias."""
    import bitsandbytes as bnb

    ref = bnb.nn.Linear4bit(
        layer.in_features, layer.out_features, bias=layer.bias is not None,
        compute_dtype=layer.compute_dtype, quant_type=layer.quant_type,
        compress_statistics=layer.nested_absmax is not None,
    )
    entries = to_bnb_state_dict(layer.quantized_weight, "w")
    stats = {key[2:]: value.clone() for key, value in entries.items() if key != "w"}
    ref.weight = bnb.nn.Params4bit.from_prequantized(entries["w"].clone(), stats, device="cpu", module=ref)
    if layer.bias is not None:
        ref.bias = nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
    return ref


def peft_twin(ours: LoraLinear):
    """PEFT's LoRA on a bitsandbytes Linear4bit with the same packed weight and adapter values.

    Returns (peft model, peft LoRA layer).
    """
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=ours.r, lora_alpha=ours.alpha, lora_dropout=0.0, target_modules=["proj"],
        use_rslora=ours.use_rslora, use_dora=ours.use_dora,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(_Holder(bnb_linear4bit(ours.base)), config)
    layer = model.base_model.model.proj
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(ours.lora_A.weight)
        layer.lora_B["default"].weight.copy_(ours.lora_B.weight)
        if ours.use_dora:
            layer.lora_magnitude_vector["default"].weight.copy_(ours.lora_magnitude_vector)
    return model, layer


def peft_grads(layer) -> dict[str, torch.Tensor]:
    """Gradients of a PEFT LoRA layer's adapter, under our names."""
    grads = {"lora_A": layer.lora_A["default"].weight.grad, "lora_B": layer.lora_B["default"].weight.grad}
    if "default" in layer.lora_magnitude_vector:
        grads["magnitude"] = layer.lora_magnitude_vector["default"].weight.grad
    return grads


def our_grads(layer: LoraLinear) -> dict[str, torch.Tensor]:
    """Gradients of our adapter parameters."""
    grads = {"lora_A": layer.lora_A.weight.grad, "lora_B": layer.lora_B.weight.grad}
    if layer.use_dora:
        grads["magnitude"] = layer.lora_magnitude_vector.grad
    return grads


def reference_lora_forward(layer: LoraLinear, x: torch.Tensor) -> torch.Tensor:
    """Pure-torch float32 QLoRA / DoRA forward from the reference-decoded weight."""
    weight = reference_weight(layer.base)
    x = x.float()
    delta = layer.scaling * (layer.lora_B.weight.float() @ layer.lora_A.weight.float())
    if layer.use_dora:
        norm = torch.linalg.norm(weight + delta.detach(), dim=1).detach()
        effective = (layer.lora_magnitude_vector.float() / norm)[:, None] * (weight + delta)
    else:
        effective = weight + delta
    bias = None if layer.base.bias is None else layer.base.bias.float()
    return torch.nn.functional.linear(x, effective, bias)
