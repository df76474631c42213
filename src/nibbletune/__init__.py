"""nibbletune: QLoRA fine-tuning with its own NF4 engine, byte-compatible with bitsandbytes."""

from .errors import NibbletuneError
from .quant import QuantizedTensor, quantize

__version__ = "0.1.0"

__all__ = ["QuantizedTensor", "quantize", "NibbletuneError", "__version__"]
