"""Putting checkpoint tensors into a weightless skeleton: which key fills which tensor, and placing it.

The skeleton (`skeleton.py`) holds its parameters and persistent buffers on the meta device;
`checkpoint_sources` maps each of them to the checkpoint key that holds it, `set_tensor` puts a
loaded value in place, and `meta_tensor_names` lists what is still missing afterwards.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


def set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    """Put `value` at the parameter or buffer `name` (a parameter becomes a frozen nn.Parameter)."""
    owner_name, _, attr = name.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    if attr in owner._parameters:
        owner._parameters[attr] = nn.Parameter(value, requires_grad=False)
    elif attr in owner._buffers:
        owner._buffers[attr] = value
    else:  # pragma: no cover - names come from the model itself
        raise KeyError(name)


def persistent_tensor_names(model: nn.Module) -> dict[str, tuple[torch.Size, bool]]:
    """Every parameter and persistent buffer name (tied duplicates included) -> (shape, is_parameter)."""
    names = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        prefix = f"{module_name}." if module_name else ""
        for attr, param in module._parameters.items():
            if param is not None:
                names[prefix + attr] = (param.shape, True)
        for attr, buffer in module._buffers.items():
            if buffer is not None and attr not in module._non_persistent_buffers_set:
                names[prefix + attr] = (buffer.shape, False)
    return names


def meta_tensor_names(model: nn.Module) -> list[str]:
    """Parameters or buffers still on the meta device (nothing was loaded into them)."""
    found = [n for n, p in model.named_parameters(remove_duplicate=False) if p.device.type == "meta"]
    found += [n for n, b in model.named_buffers(remove_duplicate=False) if b.device.type == "meta"]
    return found


_LEGACY_SUFFIXES = {".gamma": ".weight", ".beta": ".bias"}  # pre-2019 LayerNorm names


def _candidates(key: str, prefix: str) -> list[str]:
    """Model names a checkpoint key may stand for: as is, without/with the base-model prefix, legacy names."""
    names = [key]
    if prefix:
        names.append(key[len(prefix) + 1:] if key.startswith(prefix + ".") else f"{prefix}.{key}")
    for old, new in _LEGACY_SUFFIXES.items():
        if key.endswith(old):
            names += [n[: -len(old)] + new for n in list(names)]
    return names


def checkpoint_sources(model: nn.Module, keys: Iterable[str], expected: Iterable[str] | None = None) -> dict[str, str]:
    """Model tensor name -> the checkpoint key holding it.

    A key may carry or lack the model's `base_model_prefix` ("transformer.h.0..." and "h.0..." of
    GPT-2 both fill `transformer.h.0...`) and may use pre-2019 LayerNorm names (gamma/beta).
    `expected`: the model names to look for (default: every persistent tensor of `model`).
    """
    wanted = set(persistent_tensor_names(model) if expected is None else expected)
    prefix = getattr(model, "base_model_prefix", "") or ""
    sources: dict[str, str] = {}
    for key in keys:
        for name in _candidates(key, prefix):
            if name in wanted and name not in sources:
                sources[name] = key
                break
    return sources
