"""Adapter injection: pick target linears by name and swap them for LoraLinear in place.

Targets are matched the way PEFT matches `target_modules`, so an adapter config means the
same modules in both libraries:

* "all-linear": every leaf linear except the output embedding (lm_head);
* a list of names: a module matches when its full path equals a name or ends in "." + name;
* any other string: a regular expression that must match the full module path.

Leaf linears are nn.Linear, LinearNF4 and transformers' GPT-2 `Conv1D` (found by class name so
transformers is not imported here). A Conv1D stores its weight as [in, out]; it is converted to
an nn.Linear holding the transposed weight before wrapping, so LoRA shapes are PEFT's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import NibbletuneError
from .linear_nf4 import LinearNF4
from .lora import LoraLinear

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoraSettings:
    """Which linears get LoRA adapters and how they are shaped and initialised."""

    r: int = 16
    """Rank of the update B @ A."""
    alpha: float = 32
    """Scale numerator: the update is multiplied by alpha / r (alpha / sqrt(r) with rsLoRA)."""
    dropout: float = 0.05
    """Dropout on the LoRA branch input during training."""
    target_modules: str | list[str] = "all-linear"
    """"all-linear", a list of module names (last component or full path), or a full-match regex."""
    use_rslora: bool = False
    """Rank-stabilised scaling alpha / sqrt(r)."""
    use_dora: bool = False
    """DoRA: learn a per-output-row magnitude on top of LoRA."""
    init: str = "default"
    """"default" (A kaiming-uniform, B zeros), "gaussian", or "loftq" (full-precision linears only)."""
    adapter_dtype: str = "float32"
    """dtype of the adapter parameters: float32, bfloat16 or float16."""


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, LinearNF4)) or _is_conv1d(module)


def _output_embedding_paths(model: nn.Module) -> set[str]:
    paths = {"lm_head"}
    get_output = getattr(model, "get_output_embeddings", None)
    output = get_output() if callable(get_output) else None
    if output is not None:
        paths |= {name for name, module in model.named_modules() if module is output}
    return paths


def find_linear_names(model: nn.Module) -> list[str]:
    """Full paths of the leaf linear modules, in module order, without the output embedding.

    Modules inside an existing LoraLinear are not listed.
    """
    excluded = _output_embedding_paths(model)
    names, inside_lora = [], []
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix in inside_lora):
            continue
        if isinstance(module, LoraLinear):
            inside_lora.append(name)
            continue
        if _is_linear(module) and name not in excluded and name.split(".")[-1] not in excluded:
            names.append(name)
    return names


def _name_matches(path: str, name: str) -> bool:
    return path == name or path.endswith("." + name)


def resolve_targets(model: nn.Module, target_modules: str | list[str]) -> list[str]:
    """The linear module paths that `target_modules` selects (PEFT's matching rules).

    Raises NibbletuneError when a listed name, or the regex, matches no linear module.
    """
    linears = find_linear_names(model)
    available = sorted({path.split(".")[-1] for path in linears})
    if isinstance(target_modules, str):
        if target_modules == "all-linear":
            chosen = linears
        else:
            try:
                pattern = re.compile(target_modules)
            except re.error as exc:
                raise NibbletuneError(f"target_modules regex {target_modules!r} is invalid: {exc}") from None
            chosen = [path for path in linears if pattern.fullmatch(path)]
            if not chosen:
                raise NibbletuneError(
                    f"target_modules regex {target_modules!r} matches no linear module; linear names: {available}"
                )
        return chosen
    names = list(target_modules)
    if not names:
        raise NibbletuneError(f"target_modules is empty; linear names: {available}")
    unmatched = [name for name in names if not any(_name_matches(path, name) for path in linears)]
    if unmatched:
        raise NibbletuneError(f"target_modules {unmatched} match no linear module; linear names: {available}")
    return [path for path in linears if any(_name_matches(path, name) for name in names)]


def conv1d_to_linear(conv: nn.Module) -> nn.Linear:
    """An nn.Linear computing the same function as a GPT-2 Conv1D (weight [in, out] transposed)."""
    weight = conv.weight.detach()
    linear = nn.Linear(weight.shape[0], weight.shape[1], bias=conv.bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(weight.t())
        if conv.bias is not None:
            linear.bias.copy_(conv.bias.detach())
    return linear


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, module)


def adapter_dtype(settings: LoraSettings) -> torch.dtype:
    """The torch dtype named by settings.adapter_dtype."""
    if settings.adapter_dtype not in _DTYPES:
        raise NibbletuneError(f"adapter_dtype must be one of {sorted(_DTYPES)}, got {settings.adapter_dtype!r}")
    return _DTYPES[settings.adapter_dtype]


def apply_lora(model: nn.Module, settings: LoraSettings) -> list[str]:
    """Wrap the targeted linears in LoraLinear in place and freeze every other parameter.

    Returns the wrapped module paths. Only the LoRA parameters (and DoRA magnitudes) are left
    with requires_grad=True.
    """
    dtype = adapter_dtype(settings)
    paths = resolve_targets(model, settings.target_modules)
    for param in model.parameters():
        param.requires_grad_(False)
    for path in paths:
        target = model.get_submodule(path)
        if _is_conv1d(target):
            target = conv1d_to_linear(target)
        wrapped = LoraLinear(
            target, settings.r, settings.alpha, settings.dropout,
            settings.use_rslora, settings.use_dora, settings.init, dtype=dtype,
        )
        _set_submodule(model, path, wrapped)
    return paths


def lora_layers(model: nn.Module) -> dict[str, LoraLinear]:
    """Every LoraLinear in `model` by module path."""
    return {name: module for name, module in model.named_modules() if isinstance(module, LoraLinear)}
