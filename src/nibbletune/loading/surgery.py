"""Model surgery on a weightless skeleton: which linears become 4-bit, and putting tensors in place.

The skeleton is built inside `empty_parameters()`: every parameter is created on the meta
device (no memory), while buffers are created for real on the CPU. That keeps the
non-persistent buffers a meta skeleton would lose (rotary `inv_freq`, BERT `position_ids`,
causal masks) exactly as each model's `__init__` computes them, without a per-architecture
re-initialisation. Linears are then replaced one at a time by `LinearNF4` as their weights
arrive from the checkpoint.

GPT-2 style `Conv1D` layers store their weight as (in_features, out_features) and compute
x @ W + b; they are treated as linears whose weight is the transpose.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterable, Iterator

import torch
from torch import nn

try:  # transformers' GPT-2 style layer; absent in very old or stripped installs
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = ()

LINEAR_TYPES = (nn.Linear, Conv1D) if Conv1D else (nn.Linear,)
_SKELETON_LOCK = threading.Lock()


@contextlib.contextmanager
def empty_parameters() -> Iterator[None]:
    """Within the block, parameters registered on any module are moved to the meta device.

    Buffers are untouched, so they hold the values their module's `__init__` computed. This
    is the technique of accelerate's `init_empty_weights(include_buffers=False)`; the override
    of `nn.Module.register_parameter` is restored on exit and serialised by a lock.
    """
    original = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            kwargs = {"requires_grad": param.requires_grad}
            module._parameters[name] = type(param)(param.to("meta"), **kwargs)

    with _SKELETON_LOCK:
        nn.Module.register_parameter = register_on_meta
        try:
            yield
        finally:
            nn.Module.register_parameter = original


def is_linear(module: nn.Module) -> bool:
    """True for nn.Linear and transformers' Conv1D."""
    return isinstance(module, LINEAR_TYPES)


def linear_features(module: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of an nn.Linear or Conv1D."""
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    in_features, out_features = module.weight.shape
    return out_features, in_features


def to_linear_layout(module: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """The weight as (out_features, in_features): Conv1D weights are transposed."""
    if isinstance(module, nn.Linear):
        return weight
    return weight.t().contiguous()


def matches(name: str, patterns: Iterable[str]) -> bool:
    """True when a pattern names `name` as a run of whole dotted components.

    "lm_head" matches "lm_head"; "down_proj" matches "model.layers.3.mlp.down_proj";
    "layers.0" matches every module under "model.layers.0". "proj" matches nothing.
    """
    dotted = f".{name}."
    return any(f".{pattern.strip('.')}." in dotted for pattern in patterns)


def select_linears(model: nn.Module, skip_modules: Iterable[str] = ()) -> list[str]:
    """Names of the linears to quantize: every nn.Linear/Conv1D except the output head and skip_modules."""
    skip = list(skip_modules)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    selected = []
    for name, module in model.named_modules():
        if not is_linear(module) or module is head or matches(name, skip):
            continue
        selected.append(name)
    return selected


def count_linears(model: nn.Module) -> int:
    """Number of nn.Linear/Conv1D modules left (not quantized) in `model`."""
    return sum(1 for module in model.modules() if is_linear(module))


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at dotted path `name` by `new`."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


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
