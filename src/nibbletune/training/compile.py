"""`train.compile`: torch.compile each decoder layer (regional compilation), with a persistent cache.

Only the repeated decoder layer is compiled, not the whole model: every layer shares the code
of its class, so Dynamo traces it once and the other layers reuse the graph (their weights are
inputs of the graph, not constants), which keeps compile time to one layer's. What differs per
layer reaches the graph as tensors (`modules/lora_op.py`), so nothing recompiles per layer. The
LoRA linears inside are custom ops, so the graph has no break per linear; Inductor fuses the
norms, rotary embedding, activation and residual adds around them.

Inductor's caches (FX graphs and AOT autograd) live under `~/.cache/nibbletune/inductor` unless
TORCHINDUCTOR_CACHE_DIR is set, so a second run of the same model and shapes starts warm.

`auto` compiles on CUDA when the run has at least `AUTO_MIN_STEPS` steps (a cold compile costs
tens of seconds, which a somewhat faster step pays back only over a few hundred steps), and
never on the CPU, where the speed gain measured was within the noise (benchmarks/README.md,
"The fp32 regime and `train.compile`"). Where compiling fails (no C++ compiler for Inductor, an
unsupported op), the run warns once and goes on eagerly: `is_compile_failure` tells those errors
apart.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..native import kernel_cache_root

AUTO_MIN_STEPS = 300
"""Fewest optimizer steps for which `compile: auto` compiles (on CUDA)."""

BACKEND = "inductor"
"""The torch.compile backend (a module attribute so a test can swap in one that fails)."""


@dataclass(frozen=True)
class CompileChoice:
    """Whether a run compiles its decoder layers, and the reason the log gives."""

    enabled: bool
    reason: str


def choose(setting: str | bool, device: torch.device, total_steps: int, distributed: str) -> CompileChoice:
    """What `train.compile` ("auto", True or False, as the config holds it) means for a run on `device`."""
    if setting is False:
        return CompileChoice(False, "train.compile is false")
    if setting is True:
        return CompileChoice(True, "train.compile is true")
    if distributed == "fsdp":
        return CompileChoice(False, "auto: not with fsdp")
    if device.type != "cuda":
        return CompileChoice(False, f"auto: on {device.type} the eager fast path is as fast (benchmarks/README.md)")
    if total_steps < AUTO_MIN_STEPS:
        return CompileChoice(False, f"auto: {total_steps} steps are too few to pay back compiling "
                                    f"(needs {AUTO_MIN_STEPS})")
    return CompileChoice(True, f"auto: {total_steps} steps on {device.type}")


def inductor_cache_dir() -> Path:
    """Where Inductor's persistent caches go: $TORCHINDUCTOR_CACHE_DIR, else under nibbletune's cache.

    Inductor writes its temporary-directory default into the variable the first time it looks, so
    a value equal to that default counts as unset.
    """
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    configured = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if configured and os.path.abspath(configured) != os.path.abspath(default_cache_dir()):
        return Path(configured)
    return kernel_cache_root().parent / "inductor"


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated decoder layers of a transformers causal LM (the longest ModuleList of one class)."""
    best: list[nn.Module] = []
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > len(best):
            if len({type(child) for child in module}) == 1:
                best = list(module)
    return best


class CompiledLayers:
    """Decoder layers compiled in place by `nn.Module.compile`; `revert()` makes them eager again."""

    def __init__(self, layers: list[nn.Module]):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(inductor_cache_dir())
        self.layers = layers
        for layer in layers:
            layer.compile(backend=BACKEND)

    def revert(self) -> None:
        """Drop the compiled wrappers: the layers run eagerly from the next call on."""
        for layer in self.layers:
            layer._compiled_call_impl = None
        torch._dynamo.reset()


def compile_model(model: nn.Module) -> CompiledLayers | None:
    """Compile `model`'s decoder layers but the first in place; None when there are none to compile.

    The first layer stays eager: its input, the frozen embeddings' output, does not require grad
    while every later layer's does, so compiling it would mean a second graph (twice the compile
    time) for 1/N of the layers.
    """
    layers = decoder_layers(model)[1:]
    return CompiledLayers(layers) if layers else None


def is_compile_failure(error: BaseException) -> bool:
    """True for errors raised by torch.compile itself (Dynamo, Inductor, their C++ build), not by the model."""
    return type(error).__module__.startswith(("torch._dynamo", "torch._inductor"))


def describe_failure(error: BaseException) -> str:
    """'Type: first line' of the error under torch.compile's wrappers (what actually went wrong)."""
    root = error
    while (inner := getattr(root, "inner_exception", None) or root.__cause__) is not None and inner is not root:
        root = inner
    lines = str(root).strip().splitlines()
    return f"{type(root).__name__}: {lines[0][:300] if lines else ''}".rstrip(": ")


def eager():
    """A context in which compiled code runs eagerly (eval and one-off checks: no extra graphs to compile)."""
    return torch.compiler.set_stance("force_eager")
