"""Building transformers models with 4-bit linears from safetensors, and PEFT adapter files."""

from .load import UnsupportedModelError, load_config, load_model, load_tokenizer
from .safetensors_io import Checkpoint, open_checkpoint

__all__ = ["load_model", "load_config", "load_tokenizer", "open_checkpoint", "Checkpoint", "UnsupportedModelError"]

try:  # peft_adapter.py is written alongside; only its absence is tolerated, not its errors
    from .peft_adapter import load_adapter, save_adapter
except ModuleNotFoundError as exc:  # pragma: no cover
    if exc.name != f"{__name__}.peft_adapter":
        raise
else:
    __all__ += ["save_adapter", "load_adapter"]
