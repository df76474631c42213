"""Building transformers models with 4-bit linears from safetensors, and PEFT adapter files."""

from .load import UnsupportedModelError, load_config, load_model, load_tokenizer
from .peft_adapter import load_adapter, save_adapter
from .safetensors_io import Checkpoint, open_checkpoint

__all__ = [
    "load_model", "load_config", "load_tokenizer", "open_checkpoint", "Checkpoint", "UnsupportedModelError",
    "save_adapter", "load_adapter",
]
