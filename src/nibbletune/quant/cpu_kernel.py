"""Placeholder until the compiled CPU kernel lands."""


def cpu_kernel_available() -> bool:
    """True when the compiled C dequantization kernel can be used."""
    return False


def dequantize_cpu(qt, dtype, out=None):
    """Dequantize with the compiled C kernel."""
    raise NotImplementedError
