"""Layers: the frozen 4-bit linear, the LoRA/DoRA wrapper, LoftQ init, the linear-layer rule, adapter injection."""

from .inject import apply_lora, lora_layers, lora_settings_of, resolve_targets
from .linear_layers import four_bit_layer_names, linear_layers
from .linear_nf4 import LinearNF4
from .loftq import loftq_init
from .lora import LoraLinear
from .lora_settings import LoraSettings, lora_scaling

__all__ = [
    "LinearNF4",
    "LoraLinear",
    "LoraSettings",
    "apply_lora",
    "four_bit_layer_names",
    "linear_layers",
    "lora_layers",
    "lora_settings_of",
    "lora_scaling",
    "loftq_init",
    "resolve_targets",
]
