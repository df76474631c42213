"""Adapter injection: pick target linears by name and swap them for LoraLinear in place.

Targets are matched the way PEFT matches `target_modules`, among the model's linear layers
(`linear_layers.py`: nn.Linear, Conv1D and LinearNF4, never the output head or the embeddings),
so an adapter config means the same modules in both libraries:

* "all-linear": every linear layer;
* a list of names: a module matches when its full path equals a name or ends in "." + name;
* any other string: a regular expression that must match the full module path.

A GPT-2 `Conv1D` stores its weight as [in, out]; it is converted to an nn.Linear holding the
transposed weight before wrapping, so LoRA shapes are PEFT's.

`apply_lora` records its LoraSettings on the model (`lora_settings_of`), so saving the adapter
needs nothing passed back.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from ..errors import NibbletuneError
from .linear_layers import is_conv1d, linear_layers
from .lora import LoraLinear
from .lora_settings import LoraSettings

SETTINGS_ATTRIBUTE = "nibbletune_lora_settings"


def _name_matches(path: str, name: str) -> bool:
    return path == name or path.endswith("." + name)


def resolve_targets(model: nn.Module, target_modules: str | list[str]) -> list[str]:
    """The linear layer paths that `target_modules` selects (PEFT's matching rules).

    Raises NibbletuneError when a listed name, or the regex, matches no linear layer.
    """
    linears = list(linear_layers(model))
    available = sorted({path.split(".")[-1] for path in linears})
    if isinstance(target_modules, str):
        if target_modules == "all-linear":
            return linears
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


def set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    """Replace the submodule at dotted `path` by `module`."""
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, module)


def as_lora_settings(settings: LoraSettings | Any | None) -> LoraSettings:
    """LoraSettings from our own settings, a `peft.LoraConfig`, or None (the defaults)."""
    if settings is None:
        return LoraSettings()
    if isinstance(settings, LoraSettings):
        return settings
    if hasattr(settings, "to_dict") and hasattr(settings, "lora_alpha"):
        return LoraSettings.from_peft(settings, new_adapter=True)
    raise NibbletuneError(f"apply_lora takes LoraSettings or a peft.LoraConfig, got {type(settings).__name__}")


def apply_lora(model: nn.Module, settings: LoraSettings | Any | None = None) -> list[str]:
    """Wrap the targeted linears in LoraLinear in place and freeze every other parameter.

    `settings`: LoraSettings, or a `peft.LoraConfig` (interop only; peft is not needed otherwise).
    Returns the wrapped module paths. Only the LoRA parameters (and DoRA magnitudes) are left
    with requires_grad=True. The settings are kept on the model (`lora_settings_of`).
    With init="loftq" the targets must be full-precision nn.Linear layers; they become 4-bit
    with the model's recorded QuantSettings (`load_model` records them), else the defaults.
    """
    settings = as_lora_settings(settings)
    settings.check()
    if lora_layers(model):
        raise NibbletuneError("apply_lora: the model already has LoRA layers")
    dtype = settings.torch_adapter_dtype()
    paths = resolve_targets(model, settings.target_modules)
    quant = getattr(model, "nibbletune_quant_settings", None)
    for param in model.parameters():
        param.requires_grad_(False)
    for path in paths:
        target = model.get_submodule(path)
        if is_conv1d(target):
            target = conv1d_to_linear(target)
        wrapped = LoraLinear(
            target, settings.r, settings.alpha, settings.dropout, settings.use_rslora, settings.use_dora,
            settings.init, dtype=dtype, quant=quant, loftq_iters=settings.loftq_iters,
        )
        wrapped.train(model.training)  # a new module starts in train mode: dropout would be on in eval
        set_submodule(model, path, wrapped)
    setattr(model, SETTINGS_ATTRIBUTE, settings)
    return paths


def lora_settings_of(model: nn.Module) -> LoraSettings | None:
    """The LoraSettings `apply_lora` (or `load_adapter`) put on `model`; None when it has none."""
    return getattr(model, SETTINGS_ATTRIBUTE, None)


def lora_layers(model: nn.Module) -> dict[str, LoraLinear]:
    """Every LoraLinear in `model` by module path."""
    return {name: module for name, module in model.named_modules() if isinstance(module, LoraLinear)}
