"""quantize_checkpoint: a 16/32-bit safetensors checkpoint -> the bitsandbytes 4-bit serialization.

Which tensors are linear weights is decided from the model itself, not from names: the model
is built from config.json with every parameter on the meta device (no memory), and the linear
layers the 4-bit rule selects (`modules.linear_layers`: nn.Linear and GPT-2 Conv1D, never the
output head or embeddings, minus `skip_modules`) are the ones quantized, exactly the set
transformers+bitsandbytes converts to Linear4bit when it loads the result. A Conv1D weight is
stored [in, out]; it is quantized as the [out, in] linear weight, as bitsandbytes does.
Embeddings, norms, biases and lm_head are copied unchanged, as transformers+bitsandbytes do.

The source is read one tensor at a time through memory-mapped `safe_open`, each shard's
mapping released before the next is opened, and the output is written in size-bounded shards
(`ShardWriter`), so peak memory is about one output shard plus one source tensor. Everything is
written into a staging directory next to OUT and renamed at the end.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import FormatError, QuantizationError
from ..loading.model_files import config_dict, open_weights
from ..loading.model_location import resolve_model_dir
from ..loading.skeleton import skeleton_from_dir
from ..loading.surgery import checkpoint_sources
from ..modules import four_bit_layer_names
from ..modules.linear_layers import default_excluded_patterns, to_linear_layout
from ..native import return_freed_memory
from ..quant import QuantSettings, quantize, to_bnb_state_dict
from ..quant.settings import check_bnb_quant_type
from .atomic import (
    DEFAULT_SHARD_BYTES,
    ShardWriter,
    copy_model_extras,
    staged_output,
    write_json,
)

logger = logging.getLogger(__name__)

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass
class QuantizeReport:
    """What `quantize_checkpoint` did: counts and sizes in bytes."""

    out: Path
    quantized: int
    copied: int
    source_bytes: int
    output_bytes: int


def read_config_json(root: Path) -> dict:
    """The raw config.json of a model directory as a dict (FormatError if missing or invalid); for a GGUF
    base, the config transformers builds from its metadata."""
    return config_dict(root)


def _default_compute_dtype(raw_config: dict) -> str:
    dtype = raw_config.get("dtype") or raw_config.get("torch_dtype")
    return dtype if dtype in ("float16", "bfloat16") else "float32"


def quantize_checkpoint(
    src: str | os.PathLike,
    out: str | os.PathLike,
    quant: QuantSettings | None = None,
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    trust_remote_code: bool = False,
) -> QuantizeReport:
    """Write `src` (safetensors, single or sharded) to `out` in the bitsandbytes 4-bit layout.

    `quant` (default QuantSettings()) gives the format and `skip_modules`; its compute dtype is
    written as `bnb_4bit_compute_dtype` ("auto": the checkpoint's float16/bfloat16 dtype, else
    float32). transformers+bitsandbytes `from_pretrained(out)` then holds the same 4-bit codes as
    `from_pretrained(src, quantization_config=BitsAndBytesConfig(...same options...))`.
    Raises FormatError (missing/corrupt files, already quantized, missing weights),
    QuantizationError (NaN/inf), BnbFormatUnsupportedError (int4: bitsandbytes has no such type, refused
    before anything is read), OutputExistsError.
    """
    quant = quant or QuantSettings()
    check_bnb_quant_type(quant.quant_type, "a bitsandbytes 4-bit checkpoint (nibbletune quantize)")
    src = resolve_model_dir(src)
    raw_config = read_config_json(src)
    if raw_config.get("quantization_config"):
        method = raw_config["quantization_config"].get("quant_method")
        raise FormatError(f"{src}/config.json: the checkpoint is already quantized ({method}); nothing to do")
    if quant.compute_dtype == "auto":
        quant = quant.with_changes(compute_dtype=_default_compute_dtype(raw_config))
    model = skeleton_from_dir(src, trust_remote_code)
    checkpoint = open_weights(src)  # every header checked before anything is written
    sources = checkpoint_sources(model, checkpoint.keys())
    wanted = {f"{name}.weight": model.get_submodule(name) for name in four_bit_layer_names(model, quant.skip_modules)}
    missing = sorted(n for n in wanted if n not in sources)
    if missing:
        raise FormatError(f"{src}: linear weight '{missing[0]}' is missing from the checkpoint ({len(missing)} missing)")
    layers = {sources[name]: module for name, module in wanted.items()}  # checkpoint key -> linear module
    for name in layers:
        info = checkpoint.infos[name]
        if len(info.shape) != 2 or not info.dtype.is_floating_point:
            raise FormatError(f"{info.file}: '{name}' should be a 2-D float weight, got {info.dtype} {list(info.shape)}")

    quantized = copied = source_bytes = 0
    with staged_output(out, overwrite) as staging, checkpoint:
        writer = ShardWriter(staging, max_shard_bytes)
        for file in checkpoint.files:
            for key in [k for k, info in checkpoint.infos.items() if info.file == file]:
                value = checkpoint.get(key)
                source_bytes += value.numel() * value.element_size()
                if key in layers:
                    value = to_linear_layout(layers[key], value)  # Conv1D: [in, out] -> [out, in]
                    if value.dtype not in FLOAT_DTYPES:
                        value = value.float()
                    try:
                        qt = quantize(value, quant.quant_type, quant.blocksize, quant.double_quant)
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
        recorded = quant
        if quant.skip_modules:  # a given skip list replaces transformers' defaults (head, tied weights): keep them
            recorded = quant.with_changes(skip_modules=tuple(default_excluded_patterns(model)) + quant.skip_modules)
        raw_config["quantization_config"] = recorded.bnb_quantization_config()
        write_json(staging / "config.json", raw_config)
        copy_model_extras(src, staging)
        output_bytes = writer.total_bytes
    logger.info("quantized %d linear weights, copied %d tensors", quantized, copied)
    return QuantizeReport(Path(out), quantized, copied, source_bytes, output_bytes)
