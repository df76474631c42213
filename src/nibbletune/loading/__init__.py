"""Building transformers models with 4-bit linears from safetensors, and reading/writing adapter files."""

from .adapter_files import AdapterFiles, read_adapter
from .load import load_model, load_tokenizer, load_unquantized
from .model_config import UnsupportedModelError, load_config
from .peft_adapter import load_adapter, save_adapter
from .safetensors_io import Checkpoint, open_checkpoint

__all__ = [
    "load_model", "load_unquantized", "load_config", "load_tokenizer", "open_checkpoint", "Checkpoint", "UnsupportedModelError",
    "save_adapter", "load_adapter", "read_adapter", "AdapterFiles",
]
