"""Facts about the machine: CPU flags and the compute dtype that `auto` resolves to."""

from __future__ import annotations

from functools import lru_cache

import torch

from .errors import NibbletuneError

_DTYPE_NAMES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags from /proc/cpuinfo (empty where it is not readable)."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_has_native_bf16() -> bool:
    """True when the CPU has bf16 matrix instructions (avx512_bf16 or AMX)."""
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


def simd_summary() -> str:
    """A short list of the SIMD flags that matter for speed, for benchmark headers."""
    wanted = ("avx2", "fma", "avx512f", "avx512bw", "avx512_bf16", "amx_bf16", "amx_tile")
    present = [flag for flag in wanted if flag in cpu_flags()]
    return " ".join(present) or "none detected"


def resolve_compute_dtype(name: str | torch.dtype = "auto", device: str | torch.device = "cpu") -> torch.dtype:
    """Map a compute dtype name to a torch dtype; "auto" is bf16 on CUDA and on CPUs with native bf16, else fp32."""
    if isinstance(name, torch.dtype):
        return name
    if name == "auto":
        if torch.device(device).type == "cuda" or cpu_has_native_bf16():
            return torch.bfloat16
        return torch.float32
    if name not in _DTYPE_NAMES:
        raise NibbletuneError(f"unknown compute dtype {name!r}: expected auto, float32, bfloat16 or float16")
    return _DTYPE_NAMES[name]
