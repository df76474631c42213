"""Facts about the machine: CPU flags and the compute dtype that `auto` resolves to.

`auto` is bf16 on CUDA and on CPUs with native bf16 matrix instructions (avx512_bf16 or AMX:
there a bf16 matmul is ~5x faster than float32), else float32 (on AVX2-only CPUs bf16 is
emulated, ~100x slower). The environment variable `NIBBLETUNE_AUTO_COMPUTE_DTYPE` (float32,
bfloat16 or float16) overrides that choice, e.g. to run float32 on a bf16 machine without
editing configs; the test suite uses it to exercise both regimes on every machine.
"""

from __future__ import annotations

import os
from functools import lru_cache

import torch

from .errors import NibbletuneError

_DTYPE_NAMES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}
COMPUTE_DTYPE_NAMES = ("auto", "float32", "bfloat16", "float16")
AUTO_OVERRIDE_ENV = "NIBBLETUNE_AUTO_COMPUTE_DTYPE"


def dtype_name(dtype: torch.dtype | str) -> str:
    """"bfloat16" for torch.bfloat16 (and for the strings "torch.bfloat16" or "bfloat16")."""
    return str(dtype).removeprefix("torch.")


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
    """Map a compute dtype name to a torch dtype; "auto" is bf16 on CUDA and on CPUs with native bf16, else fp32.

    `NIBBLETUNE_AUTO_COMPUTE_DTYPE` replaces what "auto" means (module docstring).
    """
    if isinstance(name, torch.dtype):
        return name
    if name == "auto":
        override = os.environ.get(AUTO_OVERRIDE_ENV, "").strip()
        if override:
            if override not in _DTYPE_NAMES:
                raise NibbletuneError(f"{AUTO_OVERRIDE_ENV}={override!r}: expected float32, bfloat16 or float16")
            return _DTYPE_NAMES[override]
        if torch.device(device).type == "cuda" or cpu_has_native_bf16():
            return torch.bfloat16
        return torch.float32
    if name not in _DTYPE_NAMES:
        raise NibbletuneError(f"unknown compute dtype {name!r}: expected auto, float32, bfloat16 or float16")
    return _DTYPE_NAMES[name]
