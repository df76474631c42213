"""The 4-bit engine: codebooks, blockwise quantization, QuantizedTensor and its kernels, QuantSettings."""

from .bnb_format import from_bnb_state_dict, to_bnb_state_dict
from .codebooks import bits_per_parameter, codebook, dynamic_map
from .settings import QuantSettings
from .tensor import QuantizedTensor, QuantLayout, quantize

__all__ = [
    "QuantizedTensor",
    "QuantLayout",
    "QuantSettings",
    "quantize",
    "codebook",
    "dynamic_map",
    "bits_per_parameter",
    "from_bnb_state_dict",
    "to_bnb_state_dict",
]
