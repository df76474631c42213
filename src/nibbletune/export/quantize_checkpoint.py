"""quantize_checkpoint: a 16/32-bit safetensors checkpoint -> the bitsandbytes 4-bit serialization.

Which tensors are linear weights is decided from the model itself, not from names: the model
is built from config.json with every parameter on the meta device (no memory), and the
`nn.Linear` modules other than the output head (and `skip_modules`) are the ones quantized.
Embeddings, norms, biases and lm_head are copied unchanged, as transformers+bitsandbytes do.

The source is read one tensor at a time through memory-mapped `safe_open`, each shard's
mapping released before the next is opened, and the output is written in size-bounded shards
(`ShardWriter`), so peak memory is about one output shard plus one source tensor. Everything is
written into a staging directory next to OUT and renamed at the end.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import FormatError, NibbletuneError, QuantizationError
from ..loading.load import load_config
from ..loading.model_location import resolve_model_dir
from ..loading.safetensors_io import open_checkpoint
from ..loading.surgery import empty_parameters, matches
from ..native import return_freed_memory
from ..quant import quantize, to_bnb_state_dict
from .atomic import (
    DEFAULT_SHARD_BYTES,
    ShardWriter,
    copy_if_present,
    copy_tokenizer_files,
    staged_output,
    write_json,
)

logger = logging.getLogger(__name__)

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
COMPUTE_DTYPES = ("float32", "float16", "bfloat16")


@dataclass
class QuantizeReport:
    """What `quantize_checkpoint` did: counts and sizes in bytes."""

    out: Path
    quantized: int
    copied: int
    source_bytes: int
    output_bytes: int


def read_config_json(root: Path) -> dict:
    """The raw config.json of a model directory as a dict (FormatError if missing or invalid)."""
    path = Path(root) / "config.json"
    if not path.is_file():
        raise FormatError(f"{root}: no config.json (a transformers model directory is expected)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise FormatError(f"{path}: invalid JSON ({exc})") from None


def build_skeleton(root: Path, trust_remote_code: bool = False) -> nn.Module:
    """The causal LM described by `root/config.json`, parameters on the meta device."""
    from transformers import AutoModelForCausalLM

    config = load_config(Path(root), trust_remote_code)
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config
    try:
        with empty_parameters():
            return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except ValueError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FormatError(f"{root}/config.json: cannot build a causal LM ({first})") from None


def linear_weight_names(model: nn.Module, skip_modules: list[str] | tuple[str, ...] = ()) -> list[str]:
    """`<module>.weight` of every nn.Linear except the output head, input embeddings and skip_modules."""
    head = model.get_output_embeddings()
    embeddings = model.get_input_embeddings()
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        if module is head or module is embeddings or matches(name, skip_modules):
            continue
        names.append(f"{name}.weight")
    return names


def bnb_quantization_config(quant_type: str, double_quant: bool, compute_dtype: str,
                            skip_modules: list[str] | None = None) -> dict:
    """`quantization_config` exactly as transformers' BitsAndBytesConfig saves it (5.x)."""
    return {
        "_load_in_4bit": True,
        "_load_in_8bit": False,
        "bnb_4bit_compute_dtype": compute_dtype,
        "bnb_4bit_quant_storage": "uint8",
        "bnb_4bit_quant_type": quant_type,
        "bnb_4bit_use_double_quant": double_quant,
        "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False,
        "llm_int8_skip_modules": list(skip_modules) if skip_modules else None,
        "llm_int8_threshold": 6.0,
        "load_in_4bit": True,
        "load_in_8bit": False,
        "quant_method": "bitsandbytes",
    }


def _default_compute_dtype(raw_config: dict) -> str:
    dtype = raw_config.get("dtype") or raw_config.get("torch_dtype")
    return dtype if dtype in ("float16", "bfloat16") else "float32"


def quantize_checkpoint(
    src: str | os.PathLike,
    out: str | os.PathLike,
    quant_type: str = "nf4",
    double_quant: bool = True,
    blocksize: int = 64,
    compute_dtype: str | None = None,
    skip_modules: list[str] | None = None,
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    trust_remote_code: bool = False,
) -> QuantizeReport:
    """Write `src` (safetensors, single or sharded) to `out` in the bitsandbytes 4-bit layout.

    transformers+bitsandbytes `from_pretrained(out)` then holds the same 4-bit codes as
    `from_pretrained(src, quantization_config=BitsAndBytesConfig(...same options...))`.
    Raises FormatError (missing/corrupt files, already quantized, missing weights),
    QuantizationError (NaN/inf, bad blocksize), OutputExistsError.
    """
    src = resolve_model_dir(src)
    if quant_type not in ("nf4", "fp4"):
        raise QuantizationError(f"quant type must be nf4 or fp4, got {quant_type!r}")
    if compute_dtype is not None and compute_dtype not in COMPUTE_DTYPES:
        raise NibbletuneError(f"compute dtype must be one of {COMPUTE_DTYPES}, got {compute_dtype!r}")
    raw_config = read_config_json(src)
    if raw_config.get("quantization_config"):
        method = raw_config["quantization_config"].get("quant_method")
        raise FormatError(f"{src}/config.json: the checkpoint is already quantized ({method}); nothing to do")
    model = build_skeleton(src, trust_remote_code)
    linear_names = set(linear_weight_names(model, skip_modules or ()))
    checkpoint = open_checkpoint(src)  # every header checked before anything is written
    missing = sorted(n for n in linear_names if n not in checkpoint)
    if missing:
        raise FormatError(f"{src}: linear weight '{missing[0]}' is missing from the checkpoint ({len(missing)} missing)")
    for name in linear_names:
        info = checkpoint.infos[name]
        if len(info.shape) != 2 or not info.dtype.is_floating_point:
            raise FormatError(f"{info.file}: '{name}' should be a 2-D float weight, got {info.dtype} {list(info.shape)}")
    compute_dtype = compute_dtype or _default_compute_dtype(raw_config)

    quantized = copied = source_bytes = 0
    with staged_output(out, overwrite) as staging, checkpoint:
        writer = ShardWriter(staging, max_shard_bytes)
        for file in checkpoint.files:
            for key in [k for k, info in checkpoint.infos.items() if info.file == file]:
                value = checkpoint.get(key)
                source_bytes += value.numel() * value.element_size()
                if key in linear_names:
                    if value.dtype not in FLOAT_DTYPES:
                        value = value.float()
                    try:
                        qt = quantize(value, quant_type, blocksize, double_quant)
                    except QuantizationError as exc:
                        raise QuantizationError(f"{file}: tensor '{key}': {exc}") from None
                    for entry, tensor in to_bnb_state_dict(qt, key).items():
                        writer.add(entry, tensor)
                    quantized += 1
                    del qt
                    return_freed_memory()
                else:
                    writer.add(key, value)
                    copied += 1
                del value
            checkpoint.close()  # release this file's memory map before the next one
        writer.close()
        raw_config["quantization_config"] = bnb_quantization_config(quant_type, double_quant, compute_dtype, skip_modules)
        write_json(staging / "config.json", raw_config)
        copy_tokenizer_files(src, staging)
        copy_if_present(src, staging, ("generation_config.json",))
        output_bytes = writer.total_bytes
    logger.info("quantized %d linear weights, copied %d tensors", quantized, copied)
    return QuantizeReport(Path(out), quantized, copied, source_bytes, output_bytes)
