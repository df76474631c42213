"""Writing a model's LoRA layers as a PEFT adapter directory, and loading one onto a model.

The file layout and the single reader are in `adapter_files.py`. `save_adapter` writes the
PEFT files plus `nibbletune.json`, which records the QuantSettings of the base the adapter
trained on (read from the model's own layers), so `merge` and `generate` rebuild that base from
the adapter directory alone. `load_adapter` reads through `adapter_files.read_adapter`, then
checks every tensor against the model before changing it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ..errors import FormatError, NibbletuneError
from ..modules import LinearNF4, LoraSettings, apply_lora, linear_layers, lora_layers, lora_settings_of
from ..modules.inject import SETTINGS_ATTRIBUTE, resolve_targets
from ..modules.linear_layers import linear_features, sixteen_bit_layer_names
from ..quant import QuantSettings
from .adapter_files import CONFIG_NAME, KEY_PREFIX, SIDECAR_NAME, WEIGHTS_NAME, read_adapter, write_sidecar


def _is_causal_lm(model: nn.Module) -> bool:
    return type(model).__name__.endswith("ForCausalLM") or hasattr(model, "lm_head")


def _target_modules_field(model: nn.Module, wrapped: list[str]) -> list[str] | str:
    """Last-name list when it selects exactly the wrapped modules, else an exact-path regex."""
    names = sorted({path.split(".")[-1] for path in wrapped})
    linears = list(linear_layers(model))
    selected = {path for path in linears if any(path == n or path.endswith("." + n) for n in names)}
    if selected == set(wrapped):
        return names
    return "(" + "|".join(re.escape(path) for path in sorted(wrapped)) + ")"


def adapter_config(model: nn.Module, settings: LoraSettings, base_model_name_or_path: str | None) -> dict:
    """The adapter_config.json contents (PEFT LoraConfig fields) for `model`'s LoRA layers."""
    wrapped = list(lora_layers(model))
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM" if _is_causal_lm(model) else None,
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "r": settings.r,
        "lora_alpha": settings.alpha,
        "lora_dropout": settings.dropout,
        "target_modules": _target_modules_field(model, wrapped),
        "use_rslora": settings.use_rslora,
        "use_dora": settings.use_dora,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "lora_bias": False,
    }


def adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors of every LoraLinear under their PEFT file keys (CPU, contiguous).

    Sharded (FSDP2 DTensor) adapters are gathered whole, a collective every rank must join.
    """
    tensors = {}
    for path, layer in lora_layers(model).items():
        for name, value in layer.adapter_state_dict().items():
            value = value.detach()
            value = value.full_tensor() if hasattr(value, "full_tensor") else value
            tensors[f"{KEY_PREFIX}{path}.{name}"] = value.cpu().contiguous()
    return tensors


def base_quantization(model: nn.Module) -> QuantSettings | None:
    """The QuantSettings of `model`'s frozen base, read from its layers; None when no linear is 4-bit.

    Format and compute dtype come from the first LinearNF4 (`load_model` uses one setting for
    all); `skip_modules` lists the full paths of the linear layers kept in 16 bits.
    """
    quantized = [m for m in model.modules() if isinstance(m, LinearNF4)]
    if not quantized:
        return None
    first = quantized[0]
    return QuantSettings(quant_type=first.quant_type, blocksize=int(first.blocksize),
                         double_quant=first.nested_absmax is not None,
                         compute_dtype=str(first.compute_dtype).removeprefix("torch."),
                         skip_modules=tuple(sorted(sixteen_bit_layer_names(model))))


def save_adapter(model: nn.Module, out_dir, settings: LoraSettings | None = None,
                 base_model_name_or_path: str | None = None,
                 tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """Write `model`'s LoRA layers as a PEFT adapter directory and return its path.

    `settings` defaults to the ones `apply_lora` (or `load_adapter`) recorded on the model.
    Besides the PEFT files, `nibbletune.json` records the base quantization (`adapter_files.py`).
    Files are written into a temporary directory beside `out_dir` first. A new `out_dir` is
    created by one rename; an existing one gets the weights, the record, then the config moved
    in (each an atomic replace), leaving any other files there untouched. `tensors`: the adapter
    tensors when already gathered (`adapter_tensors` of a sharded model, called on every rank).
    """
    tensors = adapter_tensors(model) if tensors is None else tensors
    if not tensors:
        raise NibbletuneError("save_adapter: the model has no LoRA layers (call apply_lora first)")
    settings = settings or lora_settings_of(model)
    if settings is None:
        raise NibbletuneError("save_adapter: the model records no LoraSettings (pass them, or use apply_lora)")
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    config = adapter_config(model, settings, base_model_name_or_path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        with open(tmp / CONFIG_NAME, "w") as handle:
            json.dump(config, handle, indent=2, sort_keys=True)
            handle.write("\n")
        write_sidecar(tmp, base_quantization(model))
        if not out_dir.exists():
            os.rename(tmp, out_dir)
            return out_dir
        if not out_dir.is_dir():
            raise NibbletuneError(f"save_adapter: {out_dir} exists and is not a directory")
        for name in (WEIGHTS_NAME, SIDECAR_NAME, CONFIG_NAME):
            os.replace(tmp / name, out_dir / name)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _expected_shapes(model: nn.Module, settings: LoraSettings) -> dict[str, tuple[int, ...]]:
    """File key -> shape for the adapter `settings` would put on `model` (model unchanged)."""
    shapes = {}
    for path in resolve_targets(model, settings.target_modules):
        out_features, in_features = linear_features(model.get_submodule(path))
        key = f"{KEY_PREFIX}{path}."
        shapes[key + "lora_A.weight"] = (settings.r, int(in_features))
        shapes[key + "lora_B.weight"] = (int(out_features), settings.r)
        if settings.use_dora:
            shapes[key + "lora_magnitude_vector"] = (int(out_features),)
    return shapes


def load_adapter(model: nn.Module, adapter_dir, dtype: torch.dtype | None = None) -> LoraSettings:
    """Apply the LoRA layers an adapter directory describes to `model` and load its weights.

    Works for adapters written by `save_adapter` or by PEFT (read by `adapter_files.read_adapter`).
    Adapter parameters are float32 unless `dtype` is given. The new LoRA layers take the model's
    mode: a model in eval mode (as `load_model` returns it) stays in eval mode, so LoRA dropout is
    off for inference. Returns the adapter's settings (also recorded on the model). Raises
    FormatError naming the key for missing or unexpected tensors and shape mismatches,
    NibbletuneError when the model already has LoRA layers or a target matches nothing; the
    model is unchanged when any of these is raised.
    """
    adapter = read_adapter(adapter_dir)
    settings = adapter.settings
    if dtype is not None:
        settings.adapter_dtype = str(dtype).removeprefix("torch.")
    settings.torch_adapter_dtype()  # validate early
    if lora_layers(model):
        raise NibbletuneError("load_adapter: the model already has LoRA layers; load into a fresh base model")
    weights_path = adapter.path / WEIGHTS_NAME
    tensors = {f"{KEY_PREFIX}{module}.{name}": value
               for module, pair in adapter.modules.items() for name, value in pair.named().items()}
    expected = _expected_shapes(model, settings)  # checked before the model is changed
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing:
        raise FormatError(f"{weights_path}: missing {len(missing)} adapter tensors, e.g. {missing[:3]}")
    if unexpected:
        raise FormatError(f"{weights_path}: {len(unexpected)} tensors match no LoRA layer, e.g. {unexpected[:3]}")
    for key, value in tensors.items():
        if tuple(value.shape) != expected[key]:
            raise FormatError(f"{weights_path}: '{key}' has shape {tuple(value.shape)}, model expects {expected[key]}")
    apply_lora(model, settings)
    with torch.no_grad():
        for path, layer in lora_layers(model).items():
            for name, param in layer.adapter_state_dict().items():
                param.copy_(tensors[f"{KEY_PREFIX}{path}.{name}"].to(param.dtype))
    setattr(model, SETTINGS_ATTRIBUTE, settings)
    return settings
