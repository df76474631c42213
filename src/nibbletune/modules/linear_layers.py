"""The one rule for which modules are linear layers, and which of them are stored in 4 bits.

A *linear layer* of a model is a module of exactly the class `nn.Linear` (subclasses may carry
behaviour of their own and are left alone), a transformers `Conv1D` (GPT-2 style: weight stored
as [in, out], computing x @ W + b), a `LinearNF4`, or a `LoraLinear` (counted once, at its own
path, whatever its base is) - unless it is *excluded*: the output head, the input embeddings,
modules holding tied weights, the model's `_keep_in_fp32_modules`, and the module of the last
parameter (transformers' own list of modules never to quantize, `default_excluded_patterns`).

The *4-bit rule*: every linear layer is stored in 4 bits except those `skip_modules` names.
A pattern names a module path when the path ends with it, or when the pattern, read as a
regular expression, matches the path from its start up to a dot boundary: "down_proj" names
every `...mlp.down_proj`, "model.layers.0" everything in layer 0, "lm_head" the head. This is
how transformers matches `llm_int8_skip_modules`, so a checkpoint's `quantization_config` and a
`BitsAndBytesConfig` mean the same layers here as in transformers+bitsandbytes, which converts
exactly these modules to Linear4bit when it loads a model in 4 bits.

Everything that needs either answer asks this module: `load_model` (which weights to quantize),
`quantize_checkpoint` (which tensors become 4-bit entries), LoRA's "all-linear" and target
resolution, the adapter record (which linears stayed 16-bit) and `merge` (which weights training
saw quantized).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from torch import nn

from .linear_nf4 import LinearNF4
from .lora import LoraLinear

try:  # transformers' GPT-2 style layer; absent in stripped installs
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = None


def is_conv1d(module: nn.Module) -> bool:
    """True for transformers' Conv1D (weight [in, out])."""
    return Conv1D is not None and isinstance(module, Conv1D)


def is_linear_module(module: nn.Module) -> bool:
    """True for exactly nn.Linear, Conv1D, LinearNF4 and LoraLinear (by class, regardless of position)."""
    return type(module) is nn.Linear or isinstance(module, (LinearNF4, LoraLinear)) or is_conv1d(module)


def linear_features(module: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of a linear module (Conv1D: from its [in, out] weight)."""
    if is_conv1d(module):
        in_features, out_features = module.weight.shape
        return int(out_features), int(in_features)
    return int(module.out_features), int(module.in_features)


def to_linear_layout(module: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """`weight` as [out_features, in_features]: a Conv1D's [in, out] weight is transposed (contiguous)."""
    if is_conv1d(module):
        return weight.t().contiguous()
    return weight


_DOT_BOUNDARY = r"(?:(?<=\.)|(?=\.|$))"


def matches(name: str, patterns: Iterable[str]) -> bool:
    """True when a pattern names the module path `name` (module docstring): suffix, or regex from the start to a dot.

    "down_proj" matches "model.layers.3.mlp.down_proj"; "model.layers.0" matches
    "model.layers.0.mlp.up_proj" but not "model.layers.01"; "lm_head" matches "lm_head".
    """
    for pattern in patterns:
        if name.endswith(pattern):
            return True
        try:
            if re.match(rf"(?:{pattern}){_DOT_BOUNDARY}", name):
                return True
        except re.error:
            continue  # not a regular expression: only the suffix reading applies
    return False


def default_excluded_patterns(model: nn.Module) -> list[str]:
    """Modules never quantized (transformers' `get_keys_to_not_convert` plus `_keep_in_fp32_modules`).

    Both sides of tied weights, the module of the last parameter, the output head, the input
    embeddings, and the model's `_keep_in_fp32_modules`.
    """
    tied = dict(getattr(model, "all_tied_weights_keys", None) or {})
    keys = set(tied) | set(tied.values())
    parameters = list(model.named_parameters(remove_duplicate=False))
    if parameters:
        keys.add(parameters[-1][0])
    for getter in ("get_output_embeddings", "get_input_embeddings"):
        get = getattr(model, getter, None)
        try:
            found = get() if callable(get) else None
        except (NotImplementedError, AttributeError):
            found = None
        if found is not None:
            keys |= {name for name, module in model.named_modules(remove_duplicate=False) if module is found}
    patterns = {key.removesuffix(".weight") for key in keys}
    patterns |= set(getattr(model, "_keep_in_fp32_modules", None) or ())
    patterns.add("lm_head")
    return sorted(patterns)


def linear_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every linear layer of `model` by path, in module order (see the module docstring).

    A LoraLinear is listed at its own path and its children (base, lora_A, lora_B) are not.
    """
    excluded = default_excluded_patterns(model)
    found: dict[str, nn.Module] = {}
    inside: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix in inside):
            continue
        if isinstance(module, LoraLinear):
            inside.append(name)
        if is_linear_module(module) and not matches(name, excluded):
            found[name] = module
    return found


def four_bit_layer_names(model: nn.Module, skip_modules: Iterable[str] = ()) -> list[str]:
    """The linear layers stored in 4 bits under the rule: every linear layer not matched by `skip_modules`."""
    skip = list(skip_modules)
    return [name for name in linear_layers(model) if not matches(name, skip)]


def sixteen_bit_layer_names(model: nn.Module) -> list[str]:
    """Linear layers of a loaded model whose frozen weight is not 4-bit (what `skip_modules` must name to rebuild it)."""
    kept = []
    for name, module in linear_layers(model).items():
        base = module.base if isinstance(module, LoraLinear) else module
        if not isinstance(base, LinearNF4):
            kept.append(name)
    return kept
