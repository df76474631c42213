"""The 4-bit engine: codebooks, blockwise quantization, QuantizedTensor and its kernels."""

from .bnb_format import from_bnb_state_dict, to_bnb_state_dict
from .codebooks import bits_per_parameter, codebook, dynamic_map
from .tensor import QuantizedTensor, quantize

__all__ = [
    "QuantizedTensor",
    "quantize",
    "codebook",
    "dynamic_map",
    "bits_per_parameter",
    "from_bnb_state_dict",
    "to_bnb_state_dict",
]
