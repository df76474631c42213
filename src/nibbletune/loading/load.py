"""load_model: a transformers model whose linears are 4-bit, streamed from safetensors.

Steps, in the order they run (nothing is read from the weights until step 4 has passed):

1. config.json -> transformers config (unknown model types and unrequested remote code refused);
2. every safetensors header is checked against its file (truncated/corrupt files refused);
3. the model is built as a skeleton whose parameters live on the meta device, its
   non-persistent buffers (rotary tables, position ids, embedding scales) built as transformers
   builds them for the compute dtype (`skeleton.py`);
4. a plan maps each skeleton tensor to a checkpoint key and checks every shape; a missing
   weight or a mismatched shape is an error here, before any data is read;
5. tensors are read one at a time: each linear the 4-bit rule selects (`modules.linear_layers`)
   is quantized (or, for a bitsandbytes 4-bit checkpoint, decoded from its stored codes) and
   replaced by `LinearNF4`; the other tensors are cast to the compute dtype and put in place;
6. tied weights are re-tied and the model is checked for anything still on meta.

Peak memory is the 4-bit model plus about one tensor of the checkpoint.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..devices import dtype_name
from ..errors import FormatError, NibbletuneError, QuantizationError
from ..modules import LinearNF4, four_bit_layer_names
from ..modules.inject import set_submodule
from ..modules.linear_layers import is_linear_module, linear_features, sixteen_bit_layer_names, to_linear_layout
from ..native import return_freed_memory
from ..quant import QuantSettings, from_bnb_state_dict, quantize
from ..quant.bnb_format import QUANT_STATE_KEY, bnb_state_keys, is_bnb_quantized, unpack_json
from .gguf_metadata import gguf_tokenizer
from .model_config import load_config, model_class_for, pop_bnb_config
from .model_files import open_weights
from .model_location import gguf_file, resolve_model_dir
from .safetensors_io import Checkpoint, open_checkpoint
from .skeleton import build_skeleton
from .surgery import checkpoint_sources, meta_tensor_names, persistent_tensor_names, set_tensor

logger = logging.getLogger(__name__)

QUANT_SETTINGS_ATTRIBUTE = "nibbletune_quant_settings"


@dataclass
class _LinearPlan:
    """How one linear gets its weight: quantized here, or decoded from stored bitsandbytes codes."""

    name: str
    weight_key: str
    bias_key: str | None
    prequantized: bool


def load_model(
    path: str | os.PathLike,
    quant: QuantSettings | None = None,
    *,
    quantization_config: Any = None,
    trust_remote_code: bool = False,
    model_class: type | str | None = None,
    quantize_weight: Callable | None = None,
) -> nn.Module:
    """Load a transformers model from a safetensors directory (or a Hub id) with its linears in 4 bits.

    `quant` (default `QuantSettings()`: NF4, blocksize 64, double quant, compute dtype auto) says
    how; `quantization_config` takes a transformers `BitsAndBytesConfig` (or its dict) instead.
    Every linear layer the 4-bit rule selects (`modules.linear_layers`: nn.Linear and Conv1D,
    never the output head or embeddings, minus `quant.skip_modules`) becomes a frozen
    `LinearNF4`. Other parameters (embeddings, norms, lm_head, skipped linears) are cast to the
    compute dtype. A checkpoint in the bitsandbytes 4-bit serialization (config
    `quantization_config` with quant_method "bitsandbytes") is decoded as stored: its own format
    wins over `quant`, of which only the compute dtype is used. The model is returned in eval
    mode with every parameter frozen; the settings it was built with (compute dtype resolved) are
    on it as `model.nibbletune_quant_settings`.

    `model_class`: a transformers Auto class (or a concrete model class), or one of "causal-lm",
    "base", "masked-lm", "sequence-classification". By default a config whose architectures name
    a causal LM loads with AutoModelForCausalLM, anything else (BERT encoders) with AutoModel.

    `quantize_weight(model, name, weight) -> QuantizedTensor | None`: called with each linear's
    full-precision weight ([out, in]) before it is quantized; a QuantizedTensor it returns is
    stored instead of `quantize(weight)` (None: quantize as usual). LoftQ initialisation uses it
    (`nibbletune.modules.loftq_base.LoftQBase`), since the full-precision weight is gone afterwards.

    Errors (all NibbletuneError, one line naming the file or tensor): FormatError for a missing
    or corrupt file, pickle-only checkpoints, missing weights and shape mismatches;
    UnsupportedModelError for unknown model types and remote code not allowed;
    QuantizationError for weights with NaN/inf values and invalid settings.
    """
    quant = _settings(quant, quantization_config)
    model, quant = _load(resolve_model_dir(path), quant, trust_remote_code, model_class, quantize_weight, four_bit=True)
    setattr(model, QUANT_SETTINGS_ATTRIBUTE, quant.resolved())
    return model


def _load(root: os.PathLike, quant: QuantSettings, trust_remote_code: bool, model_class, quantize_weight,
          four_bit: bool) -> tuple[nn.Module, QuantSettings]:
    """load_model's work: (the model, the settings its 4-bit layers hold); `four_bit=False` keeps every
    linear in the compute dtype (a GGUF base for LoRA)."""
    dtype = quant.torch_compute_dtype()
    config = load_config(root, trust_remote_code)
    bnb_config = pop_bnb_config(config, root)
    checkpoint = open_weights(root, config)  # validates every header before anything is built
    with checkpoint:
        model = build_skeleton(config, model_class_for(config, model_class), dtype, trust_remote_code, root)
        selected = four_bit_layer_names(model, quant.skip_modules) if four_bit and not bnb_config else []
        sources, linears = _plan(model, checkpoint, selected, bnb_config is not None)
        position = {key: (str(info.file), info.offset) for key, info in checkpoint.infos.items()}
        linears.sort(key=lambda plan: position[plan.weight_key])  # read each file front to back
        for plan in linears:
            _load_linear(model, checkpoint, plan, dtype, quant, quantize_weight)
            return_freed_memory()
        done = {plan.weight_key for plan in linears} | {plan.bias_key for plan in linears}
        for name, key in sorted(sources.items(), key=lambda item: position[item[1]]):
            if key in done:
                continue
            value = checkpoint.get(key)
            set_tensor(model, name, value.to(dtype) if value.is_floating_point() else value)
    model.tie_weights()
    leftover = meta_tensor_names(model)
    if leftover:
        raise FormatError(f"{root}: no weights for {leftover[0]} ({len(leftover)} tensors missing after loading)")
    model.requires_grad_(False)
    model.eval()
    if bnb_config:
        stored = QuantSettings.from_bnb_config(bnb_config)
        quant = stored.with_changes(compute_dtype=quant.compute_dtype,
                                    skip_modules=tuple(sorted(sixteen_bit_layer_names(model))))
    return_freed_memory()
    return model, quant


def _settings(quant: QuantSettings | None, quantization_config: Any) -> QuantSettings:
    """The QuantSettings of a load_model call: ours, from a BitsAndBytesConfig, or the defaults."""
    if quant is not None and quantization_config is not None:
        raise NibbletuneError("load_model: pass quant= or quantization_config=, not both")
    if quantization_config is not None:
        return QuantSettings.from_bnb_config(quantization_config)
    if quant is None:
        return QuantSettings()
    if not isinstance(quant, QuantSettings):
        if hasattr(quant, "to_dict") and hasattr(quant, "load_in_4bit"):
            return QuantSettings.from_bnb_config(quant)  # a BitsAndBytesConfig passed positionally
        raise NibbletuneError(f"load_model: quant must be a QuantSettings, got {type(quant).__name__}")
    return quant


def _plan(model: nn.Module, checkpoint: Checkpoint, selected: list[str], prequantized_file: bool):
    """Map skeleton tensors to checkpoint keys; check shapes and completeness before reading data.

    Returns (sources: model name -> checkpoint key, linear plans).
    """
    expected = persistent_tensor_names(model)
    sources = checkpoint_sources(model, checkpoint.keys(), expected)
    tied = dict(getattr(model, "all_tied_weights_keys", None) or {})
    linear_plans: list[_LinearPlan] = []
    quantize_here = set(selected)
    for name, module in model.named_modules():
        if not is_linear_module(module):
            continue
        weight_key = sources.get(f"{name}.weight")
        prequantized = weight_key is not None and is_bnb_quantized(checkpoint, weight_key)
        if prequantized:
            _check_quant_state_shape(checkpoint, weight_key, linear_features(module))
        if prequantized or (name in quantize_here and weight_key is not None):
            bias_key = sources.get(f"{name}.bias") if module.bias is not None else None
            linear_plans.append(_LinearPlan(name, weight_key, bias_key, prequantized))
    prequantized_keys = {p.weight_key for p in linear_plans if p.prequantized}
    for name, (shape, _) in expected.items():
        key = sources.get(name)
        if key is None:
            if name in tied and tied[name] in sources:
                continue
            raise FormatError(f"{checkpoint.files[0].parent}: no weights for '{name}' in the checkpoint")
        info = checkpoint.infos[key]
        if key not in prequantized_keys and info.shape != shape:
            raise FormatError(
                f"{info.file}: tensor '{key}' has shape {list(info.shape)} but the config gives {list(shape)}"
            )
    for name in tied:
        if name in sources and tied[name] in sources:
            del sources[name]  # loaded from its source, then tied
    unexpected = set(checkpoint.keys()) - set(sources.values()) - prequantized_keys
    unexpected = {k for k in unexpected if not any(k.startswith(p + ".") for p in prequantized_keys)}
    if unexpected:
        logger.info("ignoring %d checkpoint tensors the model does not use, e.g. %s", len(unexpected), min(unexpected))
    if prequantized_file and not prequantized_keys:
        raise FormatError(f"{checkpoint.files[0].parent}: quantization_config says 4-bit but no tensor has a quant_state")
    return sources, linear_plans


def _check_quant_state_shape(checkpoint: Checkpoint, weight_key: str, features: tuple[int, int]) -> None:
    state_key = next(k for k in bnb_state_keys(weight_key, checkpoint) if QUANT_STATE_KEY in k)
    meta = unpack_json(checkpoint.get(state_key))
    stored = list(meta.get("shape", []))
    if stored != list(features):
        raise FormatError(
            f"{checkpoint.infos[state_key].file}: tensor '{weight_key}' has 4-bit shape {stored} "
            f"but the config gives {list(features)}"
        )


def _load_linear(model, checkpoint, plan: _LinearPlan, dtype: torch.dtype, quant: QuantSettings,
                 quantize_weight: Callable | None = None) -> None:
    """Read, quantize (or decode) and install one linear as LinearNF4."""
    module = model.get_submodule(plan.name)
    if plan.prequantized:
        entries = {k: checkpoint.get(k) for k in bnb_state_keys(plan.weight_key, checkpoint)}
        try:
            weight = from_bnb_state_dict(entries, plan.weight_key)
        except FormatError as exc:
            raise FormatError(f"{checkpoint.infos[plan.weight_key].file}: {exc}") from None
    else:
        value = to_linear_layout(module, checkpoint.get(plan.weight_key))
        if value.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            value = value.float()
        try:
            weight = quantize_weight(model, plan.name, value) if quantize_weight is not None else None
            if weight is None:
                weight = quantize(value, quant.quant_type, quant.blocksize, quant.double_quant)
        except QuantizationError as exc:
            raise QuantizationError(f"{checkpoint.infos[plan.weight_key].file}: tensor '{plan.weight_key}': {exc}") from None
        del value
    bias = checkpoint.get(plan.bias_key).to(dtype) if plan.bias_key else None
    set_submodule(model, plan.name, LinearNF4(weight, bias=bias, compute_dtype=dtype))


def load_tokenizer(path: str | os.PathLike, trust_remote_code: bool = False):
    """The tokenizer saved beside a model (transformers AutoTokenizer, local files or a Hub id's snapshot), or
    the one a GGUF file's metadata holds."""
    from transformers import AutoTokenizer

    root = resolve_model_dir(path)
    gguf = gguf_file(root)
    if gguf is not None:
        return gguf_tokenizer(gguf)
    if not root.is_dir():
        raise FormatError(f"{root}: not a directory")
    try:
        return AutoTokenizer.from_pretrained(root, trust_remote_code=trust_remote_code, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FormatError(f"{root}: cannot load a tokenizer ({first_line})") from None


def load_unquantized(path: str | os.PathLike, dtype: torch.dtype, trust_remote_code: bool = False) -> nn.Module:
    """A causal LM from safetensors or GGUF with every weight in `dtype` (no 4-bit layers), frozen, in eval mode.

    For training methods that keep the base in 16/32 bits (`method: lora`, `method: full`). Safetensors
    go through transformers' own loader, after the same config checks as `load_model`; a GGUF file
    through nibbletune's streaming reader (transformers >= 5 would keep its blocks packed in its own
    quantized linears, which LoRA cannot wrap).
    """
    root = resolve_model_dir(path)
    config = load_config(root, trust_remote_code)
    if getattr(config, "quantization_config", None) is not None:
        raise FormatError(f"{root}: a 4-bit checkpoint cannot be trained in 16 bits; use method qlora, or its "
                          "full-precision original")
    gguf = gguf_file(root)
    if gguf is not None:  # transformers would keep the GGUF blocks packed; nibbletune's reader dequantizes them
        model, _ = _load(root, QuantSettings(compute_dtype=dtype_name(dtype)), trust_remote_code, None, None,
                         four_bit=False)
        return model
    cls = model_class_for(config)
    open_checkpoint(root).close()  # the same header checks (and pickle refusal) as load_model
    source = {"pretrained_model_name_or_path": root, "use_safetensors": True}
    try:
        model = cls.from_pretrained(**source, config=config, dtype=dtype, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FormatError(f"{root}: cannot load the model ({first_line})") from None
    model.requires_grad_(False)
    return model.eval()
