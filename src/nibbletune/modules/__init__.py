"""Layers: the frozen 4-bit linear, the LoRA/DoRA wrapper, LoftQ init and adapter injection."""

from .inject import LoraSettings, apply_lora, find_linear_names, lora_layers, resolve_targets
from .linear_nf4 import LinearNF4
from .loftq import loftq_init
from .lora import LoftQSettings, LoraLinear, lora_scaling

__all__ = [
    "LinearNF4",
    "LoraLinear",
    "LoraSettings",
    "LoftQSettings",
    "apply_lora",
    "find_linear_names",
    "resolve_targets",
    "lora_layers",
    "lora_scaling",
    "loftq_init",
]
