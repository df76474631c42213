"""PEFT LoRA adapter files: `adapter_model.safetensors` + `adapter_config.json`.

A LoraLinear at module path `<path>` stores its tensors in the file as

    base_model.model.<path>.lora_A.weight       [r, in_features]
    base_model.model.<path>.lora_B.weight       [out_features, r]
    base_model.model.<path>.lora_magnitude_vector   [out_features]   (DoRA only, no `.weight`)

which is what `peft.PeftModel.save_pretrained` writes for the default adapter, so either
library reads the other's files. `adapter_config.json` holds PEFT's LoraConfig fields.

`save_adapter` also writes `nibbletune.json`, a sidecar PEFT ignores, recording how the base
was quantized while the adapter trained (quant type, blocksize, double quant, compute dtype,
linears left in full precision), so `merge` and `generate` rebuild the base training saw from
the adapter directory alone:

    {"format": 1, "base_quantization": {"quant_type": "nf4", "blocksize": 64, "double_quant": true,
                                         "compute_dtype": "float32", "skip_modules": []}}

`base_quantization` is null when the adapter was trained on a base with no 4-bit linears.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import FormatError, NibbletuneError
from ..modules.inject import (
    LoraSettings,
    adapter_dtype,
    apply_lora,
    find_linear_names,
    lora_layers,
    resolve_targets,
)
from ..modules.linear_nf4 import LinearNF4
from .surgery import is_linear

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
SIDECAR_NAME = "nibbletune.json"
SIDECAR_FORMAT = 1
KEY_PREFIX = "base_model.model."

# LoraConfig fields we cannot honour: loading an adapter that sets them would silently change it.
_UNSUPPORTED = {
    "modules_to_save": (None, []),
    "rank_pattern": (None, {}),
    "alpha_pattern": (None, {}),
    "layers_to_transform": (None,),
    "layers_pattern": (None, [], ""),
    "lora_bias": (None, False),
    "layer_replication": (None,),
    "alora_invocation_tokens": (None,),
    "trainable_token_indices": (None,),
    "target_parameters": (None, []),
    "exclude_modules": (None, [], ""),
}


def _is_causal_lm(model: nn.Module) -> bool:
    return type(model).__name__.endswith("ForCausalLM") or hasattr(model, "lm_head")


def _target_modules_field(model: nn.Module, wrapped: list[str]) -> list[str] | str:
    """Last-name list when it selects exactly the wrapped modules, else an exact-path regex."""
    names = sorted({path.split(".")[-1] for path in wrapped})
    linears = find_linear_names(model) + wrapped
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
    """The adapter tensors of every LoraLinear under their PEFT file keys (CPU, contiguous)."""
    tensors = {}
    for path, layer in lora_layers(model).items():
        for name, value in layer.adapter_state_dict().items():
            tensors[f"{KEY_PREFIX}{path}.{name}"] = value.detach().cpu().contiguous()
    return tensors


def base_quantization(model: nn.Module) -> dict | None:
    """How `model`'s base linears are quantized, as recorded in `nibbletune.json`; None when none is 4-bit.

    Read from the model's LinearNF4 layers (the first one's settings; `load_model` uses one
    setting for all). `skip_modules` lists the full paths of linears left in full precision,
    the output head excepted.
    """
    quantized = [m for m in model.modules() if isinstance(m, LinearNF4)]
    if not quantized:
        return None
    first = quantized[0]
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    wrapped = lora_layers(model)
    skipped = [path for path, layer in wrapped.items() if not isinstance(layer.base, LinearNF4)]
    for name, module in model.named_modules():
        inside_lora = any(name.startswith(path + ".") for path in wrapped)
        if is_linear(module) and module is not head and not inside_lora:
            skipped.append(name)
    return {
        "quant_type": first.quant_type, "blocksize": int(first.blocksize),
        "double_quant": first.nested_absmax is not None,
        "compute_dtype": str(first.compute_dtype).removeprefix("torch."), "skip_modules": sorted(skipped),
    }


def read_base_quantization(adapter_dir) -> tuple[bool, dict | None]:
    """(found, settings) from an adapter's `nibbletune.json`; (False, None) when there is none.

    `settings` is None when the adapter was trained on a base without 4-bit linears. FormatError
    for an unreadable or malformed sidecar.
    """
    path = Path(adapter_dir) / SIDECAR_NAME
    if not path.is_file():
        return False, None
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FormatError(f"{path}: cannot read ({exc})") from None
    if not isinstance(record, dict) or "base_quantization" not in record:
        raise FormatError(f"{path}: expected a JSON object with 'base_quantization'")
    quant = record["base_quantization"]
    if quant is None:
        return True, None
    if not isinstance(quant, dict) or quant.get("quant_type") not in ("nf4", "fp4") \
            or not isinstance(quant.get("blocksize"), int) or not isinstance(quant.get("double_quant"), bool):
        raise FormatError(f"{path}: 'base_quantization' needs quant_type nf4|fp4, integer blocksize and "
                          f"boolean double_quant, got {quant!r}")
    return True, {
        "quant_type": quant["quant_type"], "blocksize": quant["blocksize"], "double_quant": quant["double_quant"],
        "compute_dtype": quant.get("compute_dtype"), "skip_modules": list(quant.get("skip_modules") or []),
    }


def save_adapter(model: nn.Module, out_dir, settings: LoraSettings, base_model_name_or_path: str | None = None) -> Path:
    """Write `model`'s LoRA layers as a PEFT adapter directory and return its path.

    Besides the PEFT files, `nibbletune.json` records the base quantization (module docstring).
    Files are written into a temporary directory beside `out_dir` first. A new `out_dir` is
    created by one rename; an existing one gets the weights, the sidecar, then the config moved
    in (each an atomic replace), leaving any other files there untouched.
    """
    tensors = adapter_tensors(model)
    if not tensors:
        raise NibbletuneError("save_adapter: the model has no LoRA layers (call apply_lora first)")
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    config = adapter_config(model, settings, base_model_name_or_path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        with open(tmp / CONFIG_NAME, "w") as handle:
            json.dump(config, handle, indent=2, sort_keys=True)
            handle.write("\n")
        sidecar = {"format": SIDECAR_FORMAT, "base_quantization": base_quantization(model)}
        (tmp / SIDECAR_NAME).write_text(json.dumps(sidecar, indent=2, sort_keys=True) + "\n")
        if not out_dir.exists():
            os.rename(tmp, out_dir)
            return out_dir
        if not out_dir.is_dir():
            raise NibbletuneError(f"save_adapter: {out_dir} exists and is not a directory")
        os.replace(tmp / WEIGHTS_NAME, out_dir / WEIGHTS_NAME)
        os.replace(tmp / SIDECAR_NAME, out_dir / SIDECAR_NAME)
        os.replace(tmp / CONFIG_NAME, out_dir / CONFIG_NAME)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def read_adapter_config(adapter_dir) -> LoraSettings:
    """Parse adapter_config.json into LoraSettings; FormatError for anything we cannot honour."""
    path = Path(adapter_dir) / CONFIG_NAME
    if not path.is_file():
        raise FormatError(f"{path}: not found (a PEFT adapter directory holds {CONFIG_NAME} and {WEIGHTS_NAME})")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FormatError(f"{path}: invalid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise FormatError(f"{path}: expected a JSON object")
    if config.get("peft_type") != "LORA":
        raise FormatError(f"{path}: peft_type is {config.get('peft_type')!r}, only 'LORA' adapters are supported")
    for field in ("r", "lora_alpha", "target_modules"):
        if field not in config:
            raise FormatError(f"{path}: missing '{field}'")
    if config.get("bias", "none") != "none":
        raise FormatError(f"{path}: bias={config['bias']!r} is not supported (only 'none')")
    for field, neutral in _UNSUPPORTED.items():
        if config.get(field) not in neutral:
            raise FormatError(f"{path}: '{field}' = {config[field]!r} is not supported")
    r, alpha, targets = config["r"], config["lora_alpha"], config["target_modules"]
    if not isinstance(r, int) or r <= 0 or not isinstance(alpha, (int, float)):
        raise FormatError(f"{path}: r must be a positive integer and lora_alpha a number, got r={r!r}, lora_alpha={alpha!r}")
    if not (isinstance(targets, str) or (isinstance(targets, list) and all(isinstance(t, str) for t in targets))):
        raise FormatError(f"{path}: target_modules must be a string or a list of strings, got {targets!r}")
    return LoraSettings(
        r=r, alpha=alpha, dropout=float(config.get("lora_dropout", 0.0)), target_modules=targets,
        use_rslora=bool(config.get("use_rslora", False)), use_dora=bool(config.get("use_dora", False)),
        init="default",
    )


def _expected_shapes(model: nn.Module, settings: LoraSettings) -> dict[str, tuple[int, ...]]:
    """File key -> shape for the adapter `settings` would put on `model` (model unchanged)."""
    shapes = {}
    for path in resolve_targets(model, settings.target_modules):
        module = model.get_submodule(path)
        if hasattr(module, "in_features"):
            in_features, out_features = module.in_features, module.out_features
        else:  # GPT-2 Conv1D: weight [in, out]
            in_features, out_features = module.weight.shape
        key = f"{KEY_PREFIX}{path}."
        shapes[key + "lora_A.weight"] = (settings.r, int(in_features))
        shapes[key + "lora_B.weight"] = (int(out_features), settings.r)
        if settings.use_dora:
            shapes[key + "lora_magnitude_vector"] = (int(out_features),)
    return shapes


def load_adapter(model: nn.Module, adapter_dir, dtype: torch.dtype | None = None) -> LoraSettings:
    """Apply the LoRA layers an adapter directory describes to `model` and load its weights.

    Works for adapters written by `save_adapter` or by PEFT. Adapter parameters are float32
    unless `dtype` is given. The new LoRA layers take the model's mode: a model in eval mode
    (as `load_model` returns it) stays fully in eval mode, so LoRA dropout is off for inference. Returns the adapter's settings. Raises FormatError naming the key
    for missing or unexpected tensors and shape mismatches, NibbletuneError when the model
    already has LoRA layers or a target matches nothing.
    """
    adapter_dir = Path(adapter_dir)
    settings = read_adapter_config(adapter_dir)
    if dtype is not None:
        settings.adapter_dtype = str(dtype).removeprefix("torch.")
    adapter_dtype(settings)  # validate early
    if lora_layers(model):
        raise NibbletuneError("load_adapter: the model already has LoRA layers; load into a fresh base model")
    weights_path = adapter_dir / WEIGHTS_NAME
    if not weights_path.is_file():
        raise FormatError(f"{weights_path}: not found")
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError) as exc:
        raise FormatError(f"{weights_path}: cannot read ({exc})") from None
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
            layer.train(model.training)  # new modules start in train mode: dropout would be on
            for name, param in layer.adapter_state_dict().items():
                param.copy_(tensors[f"{KEY_PREFIX}{path}.{name}"].to(param.dtype))
    return settings
