"""merge: fold a LoRA/DoRA adapter into its base, as a pure function over weights.

For each linear that training ran in 4 bits, the base weight is what training saw:
dequantize(quantize(W)) with the adapter's recorded quantization settings (or, for a base that
is already a bitsandbytes 4-bit checkpoint, the stored codes decoded). LoRA targets then get
W + scaling * B @ A in float32 (DoRA: magnitude * (W + sBA) / ||W + sBA||_row, as PEFT merges),
and every tensor is cast to the output dtype. Nothing is re-quantized: the merged model is a
plain 16/32-bit transformers checkpoint; `nibbletune quantize` makes a 4-bit one from it.

`base_16bit` merges onto the original full-precision weights instead; the quantization error
training compensated for is then missing from the result, and verification shows how much.

The base is streamed one tensor at a time and the output written in bounded shards, into a
staging directory that is verified (`verify.compare_merged`) and only then renamed to OUT.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import FormatError, NibbletuneError
from ..loading import read_adapter
from ..loading.adapter_files import check_adapter_fits, linear_shapes
from ..loading.base_record import BaseQuantRecord, recorded_base_quantization
from ..loading.model_files import open_weights
from ..loading.model_location import resolve_model_dir
from ..loading.skeleton import skeleton_from_dir
from ..loading.surgery import checkpoint_sources
from ..modules import four_bit_layer_names, linear_layers
from ..modules.linear_layers import to_linear_layout
from ..modules.loftq import read_loftq_note
from ..native import return_freed_memory
from ..quant import QuantSettings, from_bnb_state_dict, quantize
from ..quant.bnb_format import bnb_state_keys, is_bnb_quantized
from .adapter_fit import merged_lora_weight
from .atomic import (
    DEFAULT_SHARD_BYTES,
    ShardWriter,
    check_output,
    copy_model_extras,
    staged_output,
    write_json,
)
from .quantize_checkpoint import read_config_json

logger = logging.getLogger(__name__)

OUTPUT_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass
class MergeReport:
    """What `merge` wrote and how the verification went (None when skipped)."""

    out: Path
    dtype: str
    merged_modules: int
    output_bytes: int
    base_16bit: bool
    verification: object | None
    base_record: BaseQuantRecord


def merge(
    base: str | os.PathLike,
    adapter: str | os.PathLike,
    out: str | os.PathLike,
    dtype: str | None = None,
    base_16bit: str | os.PathLike | None = None,
    quant: QuantSettings | None = None,
    verify: bool = True,
    tolerance: float | None = None,
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    trust_remote_code: bool = False,
) -> MergeReport:
    """Merge `adapter` into `base`, write a plain checkpoint to `out`, verify it, return a report.

    The base quantization training used is read from the adapter directory
    (`loading.base_record.recorded_base_quantization`: nibbletune.json, else the run's config.yaml,
    else defaults); `quant` replaces it. Adapters are read by `loading.read_adapter`, so merge
    refuses exactly what `load_adapter` (generate, resume) refuses.
    Raises FormatError / AdapterMismatchError before anything is written when the inputs do not
    fit, OutputExistsError for an existing `out`, VerificationError (after removing the
    unverified output) when the merged model's logits are off.
    """
    base, out = resolve_model_dir(base), Path(out)
    check_output(out, overwrite)
    lora = read_adapter(adapter)
    _refuse_rebuilt_loftq_base(adapter)
    record = BaseQuantRecord(quant, "command line") if quant is not None else recorded_base_quantization(adapter)
    raw_config = read_config_json(base)
    base_is_4bit = bool(raw_config.get("quantization_config"))
    source = Path(base_16bit) if base_16bit else base
    if base_16bit:
        source_config = read_config_json(source)
        if source_config.get("quantization_config"):
            raise FormatError(f"{source}: --base-16bit must point to full-precision weights, not a 4-bit checkpoint")
        raw_config = source_config
    out_dtype_name = dtype or _default_dtype(raw_config)
    if out_dtype_name not in OUTPUT_DTYPES:
        raise NibbletuneError(f"dtype must be one of {sorted(OUTPUT_DTYPES)}, got {out_dtype_name!r}")
    out_dtype = OUTPUT_DTYPES[out_dtype_name]

    skeleton = skeleton_from_dir(source, trust_remote_code)
    linear_modules = linear_layers(skeleton)
    check_adapter_fits(lora, linear_shapes(skeleton), source)
    # linears training ran in 4 bits from full-precision weights (a 4-bit base is decoded as stored)
    decoded_as_stored = base_16bit or base_is_4bit or record.settings is None
    trained_4bit = set() if decoded_as_stored else set(four_bit_layer_names(skeleton, record.settings.skip_modules))
    checkpoint = open_weights(source)
    sources = checkpoint_sources(skeleton, checkpoint.keys())  # model name -> key (prefix-less keys included)
    module_of = {key: name.removesuffix(".weight") for name, key in sources.items()}
    missing = [m for m in lora.modules if f"{m}.weight" not in sources]
    if missing:
        raise FormatError(f"{source}: weight '{missing[0]}.weight' of an adapter target is missing from the checkpoint")

    merged_count = 0
    with staged_output(out, overwrite) as staging, checkpoint:
        writer = ShardWriter(staging, max_shard_bytes)
        aux = {k for key in checkpoint.infos if is_bnb_quantized(checkpoint, key)
               for k in bnb_state_keys(key, checkpoint) if k != key}
        for file in checkpoint.files:
            keys = [k for k, info in checkpoint.infos.items() if info.file == file]
            for key in keys:
                if key in aux:
                    continue  # absmax, quant_map, ... of a 4-bit weight: consumed with the weight
                module_name = module_of.get(key, key.removesuffix(".weight"))
                weight = _base_tensor(checkpoint, key, module_name, linear_modules, trained_4bit, record.settings)
                if module_name in lora.modules and key.endswith(".weight"):
                    module = linear_modules[module_name]  # Conv1D: (in, out) on disk, transposed both ways
                    merged = merged_lora_weight(to_linear_layout(module, weight), lora.modules[module_name], lora.scaling)
                    weight = to_linear_layout(module, merged)
                    merged_count += 1
                writer.add(key, weight.to(out_dtype) if weight.is_floating_point() else weight)
                del weight
                return_freed_memory()
            checkpoint.close()
        writer.close()
        raw_config.pop("quantization_config", None)
        raw_config["dtype"] = out_dtype_name
        raw_config.pop("torch_dtype", None)
        write_json(staging / "config.json", raw_config)
        copy_model_extras(base, staging, tokenizer_from=adapter)
        verification = None
        if verify:
            from .verify import check_merged

            verification = check_merged(
                base, adapter, staging, record.settings, out_dtype_name, base_16bit=bool(base_16bit),
                tolerance=tolerance, trust_remote_code=trust_remote_code,
            )
        output_bytes = writer.total_bytes
    return MergeReport(out, out_dtype_name, merged_count, output_bytes, bool(base_16bit), verification, record)


def _refuse_rebuilt_loftq_base(adapter) -> None:
    """A LoftQ adapter of 2+ rounds was trained on Q(W - s B0 A0), which this merge does not rebuild."""
    note = read_loftq_note(adapter)
    if note and not note.get("base_is_plain_quantization", True):
        raise NibbletuneError(
            f"{adapter}: a {note.get('num_iters')}-round LoftQ adapter was trained on the base Q(W - s*B0*A0), "
            "not on Q(W) or W, so a merge onto either would change its outputs; see its loftq.json")


def _default_dtype(raw_config: dict) -> str:
    name = raw_config.get("dtype") or raw_config.get("torch_dtype")
    return name if name in OUTPUT_DTYPES else "bfloat16"


def _base_tensor(checkpoint, key: str, module_name: str, linear_modules: dict, trained_4bit: set,
                 settings: QuantSettings | None) -> torch.Tensor:
    """The tensor `key` as the training run saw it (float32 for linear weights).

    A stored 4-bit weight is decoded; a linear weight that training quantized is passed through
    quantize -> dequantize with the training settings (in the linear (out, in) layout, as
    `load_model` quantizes it); anything else is read as is.
    """
    if is_bnb_quantized(checkpoint, key):
        entries = {k: checkpoint.get(k) for k in bnb_state_keys(key, checkpoint)}
        try:
            qt = from_bnb_state_dict(entries, key)
        except FormatError as exc:
            raise FormatError(f"{checkpoint.infos[key].file}: {exc}") from None
        return qt.dequantize(torch.float32)
    value = checkpoint.get(key)
    if not value.is_floating_point():
        return value
    if key.endswith(".weight") and module_name in trained_4bit:
        module = linear_modules[module_name]
        as_linear = to_linear_layout(module, value)
        if as_linear.dtype not in _FLOAT_DTYPES:
            as_linear = as_linear.float()
        decoded = quantize(as_linear, settings.quant_type, settings.blocksize, settings.double_quant)
        restored = decoded.dequantize(torch.float32)
        return to_linear_layout(module, restored)
    if module_name in linear_modules and key.endswith(".weight"):
        return value.float()  # a LoRA target may still need the float32 merge
    return value  # cast straight to the output dtype: no float32 copy of embeddings or lm_head
