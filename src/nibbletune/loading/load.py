"""load_model: a transformers model whose linears are 4-bit, streamed from safetensors.

Steps, in the order they run (nothing is read from the weights until step 4 has passed):

1. config.json -> transformers config (unknown model types and unrequested remote code refused);
2. every safetensors header is checked against its file (truncated/corrupt files refused);
3. the model is built as a skeleton whose parameters live on the meta device (buffers real,
   see `surgery.empty_parameters`);
4. a plan maps each skeleton tensor to a checkpoint key and checks every shape; a missing
   weight or a mismatched shape is an error here, before any data is read;
5. tensors are read one at a time: each selected linear's weight is quantized (or, for a
   bitsandbytes 4-bit checkpoint, decoded from its stored codes) and the linear is replaced
   by `LinearNF4`; the other tensors are cast to the compute dtype and put in place;
6. tied weights are re-tied and the model is checked for anything still on meta.

Peak memory is the 4-bit model plus about one tensor of the checkpoint.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..devices import resolve_compute_dtype
from ..errors import FormatError, NibbletuneError, QuantizationError
from ..modules import LinearNF4
from ..native import return_freed_memory
from ..quant import from_bnb_state_dict, quantize
from ..quant.bnb_format import QUANT_STATE_KEY, bnb_state_keys, is_bnb_quantized, unpack_json
from .json_files import read_json_file
from .model_location import resolve_model_dir
from .safetensors_io import Checkpoint, open_checkpoint
from .surgery import (
    empty_parameters,
    is_linear,
    linear_features,
    meta_tensor_names,
    persistent_tensor_names,
    select_linears,
    set_submodule,
    set_tensor,
    to_linear_layout,
)

logger = logging.getLogger(__name__)

CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")
_LEGACY_SUFFIXES = {".gamma": ".weight", ".beta": ".bias"}  # pre-2019 LayerNorm names


class UnsupportedModelError(NibbletuneError, ValueError):
    """A model type transformers does not know, or one needing remote code that was not allowed."""


@dataclass
class _LinearPlan:
    """How one linear gets its weight: quantized here, or decoded from stored bitsandbytes codes."""

    name: str
    weight_key: str
    bias_key: str | None
    prequantized: bool


def load_model(
    path: str | os.PathLike,
    quant_type: str = "nf4",
    double_quant: bool = True,
    blocksize: int = 64,
    compute_dtype: str | torch.dtype = "auto",
    skip_modules: list[str] | None = None,
    trust_remote_code: bool = False,
    model_class: type | str | None = None,
    quantize_weight: Callable | None = None,
) -> nn.Module:
    """Load a transformers model from a safetensors directory with its linears in 4 bits.

    Every nn.Linear / Conv1D except the output head (lm_head) and modules named in
    `skip_modules` (whole dotted components: "down_proj", "layers.0", "pooler.dense") becomes
    a frozen `LinearNF4`. Other parameters (embeddings, norms, lm_head, skipped linears) are
    cast to the compute dtype (`compute_dtype`, "auto" resolved by `resolve_compute_dtype`).
    A checkpoint in the bitsandbytes 4-bit serialization (config `quantization_config` with
    quant_method "bitsandbytes") is decoded as stored; the quantization arguments are then
    unused. The model is returned in eval mode with every parameter frozen.

    `model_class`: a transformers Auto class (or a concrete model class), or one of "causal-lm",
    "base", "masked-lm", "sequence-classification". By default a config whose architectures name
    a causal LM loads with AutoModelForCausalLM, anything else (BERT encoders) with AutoModel.

    `quantize_weight(model, name, weight) -> QuantizedTensor | None`: called with each linear's
    full-precision weight ([out, in]) before it is quantized; a QuantizedTensor it returns is
    stored instead of `quantize(weight)` (None: quantize as usual). LoftQ initialisation uses it
    (`nibbletune.modules.loftq.LoftQBase`), since the full-precision weight is gone afterwards.

    Errors (all NibbletuneError, one line naming the file or tensor): FormatError for a missing
    or corrupt file, pickle-only checkpoints, missing weights and shape mismatches;
    UnsupportedModelError for unknown model types and remote code not allowed;
    QuantizationError for weights with NaN/inf values.
    """
    root = resolve_model_dir(path)
    dtype = resolve_compute_dtype(compute_dtype)
    config = load_config(root, trust_remote_code)
    bnb_config = _pop_bnb_config(config, root)
    checkpoint = open_checkpoint(root)  # validates every header before anything is built
    with checkpoint:
        model = _build_skeleton(config, model_class, trust_remote_code, root)
        selected = [] if bnb_config else select_linears(model, skip_modules or ())
        sources, linears = _plan(model, checkpoint, selected, bnb_config is not None)
        position = {key: (str(info.file), info.offset) for key, info in checkpoint.infos.items()}
        linears.sort(key=lambda plan: position[plan.weight_key])  # read each file front to back
        for plan in linears:
            _load_linear(model, checkpoint, plan, dtype, quant_type, blocksize, double_quant, quantize_weight)
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
    return model


def load_config(root: str | os.PathLike, trust_remote_code: bool = False):
    """Read `root/config.json` as a transformers config; refuse unknown types and unrequested remote code.

    `root` may also be a Hugging Face Hub id (see `model_location.resolve_model_dir`).
    """
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    root = resolve_model_dir(root)
    config_file = root / "config.json"
    raw = read_json_file(root, "config.json", "a transformers model directory")
    model_type = raw.get("model_type")
    if "auto_map" in raw and not trust_remote_code and model_type not in CONFIG_MAPPING_NAMES:
        raise UnsupportedModelError(
            f"{config_file}: model_type {model_type!r} needs the checkpoint's own Python code; "
            "pass trust_remote_code=True if you trust it"
        )
    if model_type is None:
        raise FormatError(f"{config_file}: no 'model_type' key")
    if model_type not in CONFIG_MAPPING_NAMES and "auto_map" not in raw:
        raise UnsupportedModelError(
            f"{config_file}: unknown model_type {model_type!r} (not supported by the installed transformers)"
        )
    try:
        return AutoConfig.from_pretrained(root, trust_remote_code=trust_remote_code)
    except (ValueError, OSError, KeyError, TypeError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FormatError(f"{config_file}: cannot build the config ({first_line})") from None


def _pop_bnb_config(config, root: Path) -> dict | None:
    """Remove and return a bitsandbytes 4-bit `quantization_config` (None when absent)."""
    qconfig = getattr(config, "quantization_config", None)
    if qconfig is None:
        return None
    qconfig = qconfig if isinstance(qconfig, dict) else qconfig.to_dict()
    if qconfig.get("quant_method") != "bitsandbytes" or not qconfig.get("load_in_4bit"):
        raise FormatError(
            f"{root / 'config.json'}: quantization_config {qconfig.get('quant_method')!r} is not supported "
            "(only bitsandbytes load_in_4bit checkpoints)"
        )
    del config.quantization_config
    return qconfig


def _model_class(config, model_class: type | str | None):
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    named = {
        "causal-lm": transformers.AutoModelForCausalLM,
        "base": transformers.AutoModel,
        "masked-lm": transformers.AutoModelForMaskedLM,
        "sequence-classification": transformers.AutoModelForSequenceClassification,
    }
    if isinstance(model_class, str):
        if model_class not in named:
            raise NibbletuneError(f"model_class {model_class!r} unknown: expected one of {sorted(named)} or a class")
        return named[model_class]
    if model_class is not None:
        return model_class
    architectures = getattr(config, "architectures", None) or []
    if architectures:
        causal = any(a.endswith(CAUSAL_SUFFIXES) for a in architectures)
    else:
        causal = config.model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES
    return named["causal-lm" if causal else "base"]


def _build_skeleton(config, model_class, trust_remote_code: bool, root: Path) -> nn.Module:
    """The model with parameters on meta and real buffers."""
    cls = _model_class(config, model_class)
    kwargs = {"trust_remote_code": trust_remote_code} if hasattr(cls, "_model_mapping") else {}
    try:
        with empty_parameters():
            return cls.from_config(config, **kwargs)
    except ValueError as exc:
        first_line = str(exc).strip().splitlines()[0]
        raise UnsupportedModelError(
            f"{root / 'config.json'}: cannot build {getattr(cls, '__name__', cls)} for model_type "
            f"{config.model_type!r} ({first_line})"
        ) from None


def _candidates(key: str, prefix: str) -> list[str]:
    """Model names a checkpoint key may stand for: as is, without/with the base-model prefix, legacy names."""
    names = [key]
    if prefix:
        names.append(key[len(prefix) + 1:] if key.startswith(prefix + ".") else f"{prefix}.{key}")
    for old, new in _LEGACY_SUFFIXES.items():
        if key.endswith(old):
            names += [n[: -len(old)] + new for n in list(names)]
    return names


def _plan(model: nn.Module, checkpoint: Checkpoint, selected: list[str], prequantized_file: bool):
    """Map skeleton tensors to checkpoint keys; check shapes and completeness before reading data.

    Returns (sources: model name -> checkpoint key, linear plans).
    """
    expected = persistent_tensor_names(model)
    prefix = getattr(model, "base_model_prefix", "") or ""
    sources: dict[str, str] = {}
    for key in checkpoint.keys():
        for name in _candidates(key, prefix):
            if name in expected and name not in sources:
                sources[name] = key
                break
    tied = dict(getattr(model, "all_tied_weights_keys", None) or {})
    linear_plans: list[_LinearPlan] = []
    quantize_here = set(selected)
    for name, module in model.named_modules():
        if not is_linear(module):
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


def _load_linear(model, checkpoint, plan: _LinearPlan, dtype, quant_type, blocksize, double_quant,
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
                weight = quantize(value, quant_type, blocksize, double_quant)
        except QuantizationError as exc:
            raise QuantizationError(f"{checkpoint.infos[plan.weight_key].file}: tensor '{plan.weight_key}': {exc}") from None
        del value
    bias = checkpoint.get(plan.bias_key).to(dtype) if plan.bias_key else None
    set_submodule(model, plan.name, LinearNF4(weight, bias=bias, compute_dtype=dtype))


def load_tokenizer(path: str | os.PathLike, trust_remote_code: bool = False):
    """The tokenizer saved beside a model (transformers AutoTokenizer, local files or a Hub id's snapshot)."""
    from transformers import AutoTokenizer

    root = resolve_model_dir(path)
    if not root.is_dir():
        raise FormatError(f"{root}: not a directory")
    try:
        return AutoTokenizer.from_pretrained(root, trust_remote_code=trust_remote_code, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FormatError(f"{root}: cannot load a tokenizer ({first_line})") from None
