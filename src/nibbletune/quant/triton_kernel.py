"""Placeholder until the Triton kernel lands."""


def triton_available() -> bool:
    """True when Triton can run the GPU kernel."""
    return False


def dequantize_triton(qt, dtype, out=None):
    """Dequantize with the Triton kernel."""
    raise NotImplementedError
