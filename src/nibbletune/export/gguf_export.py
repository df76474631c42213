"""export_gguf: a merged (plain) checkpoint -> one llama.cpp GGUF file, read back and checked.

Families: Llama, Mistral, Qwen2, Qwen3, Gemma 3 (text) and Phi-3; what each needs (arch name,
rope layout, norm shift, `<arch>.*` keys) is in `gguf_arch.py`, the tokenizer in `gguf_vocab.py`.
Names, metadata and layout follow llama.cpp's `convert_hf_to_gguf.py`:
- tensor names from `gguf.get_tensor_name_map(arch, n_layers)` (model.layers.3.self_attn.q_proj
  -> blk.3.attn_q.weight); rotary inv_freq buffers are not exported;
- Llama and Mistral (both the "llama" architecture in llama.cpp) store q_proj/k_proj rows
  permuted from HF's rotate-half order to llama.cpp's interleaved order:
  W.reshape(n_head, 2, rows // n_head // 2, cols).swapaxes(1, 2).reshape(rows, cols)
  (n_head = num_key_value_heads for k_proj); the other families use neox rope: no permute;
- Gemma 3 norms are stored as 1 + w;
- 1-D tensors (norms, biases) stay F32; 2-D tensors take the requested type; q8_0/q4_0 rows
  that are not a multiple of 32 fall back to F16, as convert_hf_to_gguf does;
- Llama 3.1 "llama3" rope as a `rope_freqs.weight` tensor.

The file is written in two passes over the checkpoint (header from the safetensors headers,
then one tensor at a time), into a staging file renamed at the end, after it has been read back
with `gguf.GGUFReader` and compared tensor by tensor with the source.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import NibbletuneError
from ..loading.safetensors_io import open_checkpoint
from .atomic import staged_output
from .gguf_arch import (
    ARCHITECTURES,
    ArchSpec,
    GGUFExportError,
    arch_spec,
    llama3_rope_factors,
    rope_settings,
    warn_sliding_window,
)
from .gguf_vocab import PRE_TOKENIZER_REGEXES, detect_tokenizer_pre, write_tokenizer
from .quantize_checkpoint import read_config_json

__all__ = ["ARCHITECTURES", "OUT_TYPES", "PRE_TOKENIZER_REGEXES", "GGUFExportError", "GGUFReport",
           "detect_tokenizer_pre", "export_gguf", "llama_permute", "model_arch", "rope_settings", "verify_gguf"]

OUT_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")
# out type -> (GGML type of 2-D weights, general.file_type, max |err| / max |x| accepted on read-back)
_TYPES = {
    "f32": ("F32", "ALL_F32", 0.0),
    "f16": ("F16", "MOSTLY_F16", 1e-3),
    "bf16": ("BF16", "MOSTLY_BF16", 8e-3),
    "q8_0": ("Q8_0", "MOSTLY_Q8_0", 1.0 / 127 + 1e-3),
    "q4_0": ("Q4_0", "MOSTLY_Q4_0", 1.0 / 7 + 1e-2),
}


@dataclass
class GGUFReport:
    """What `export_gguf` wrote."""

    out: Path
    arch: str
    out_type: str
    tensors: int
    file_bytes: int
    max_rel_error: float


def _import_gguf():
    try:
        import gguf
    except ImportError:  # pragma: no cover
        raise NibbletuneError("GGUF export needs the `gguf` package: pip install 'nibbletune[export]'") from None
    return gguf


def llama_permute(weight: torch.Tensor, n_head: int, n_head_kv: int | None = None) -> torch.Tensor:
    """llama.cpp's q/k row permutation (convert_hf_to_gguf.LlamaModel.permute)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    rows = weight.shape[0]
    return weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def model_arch(raw_config: dict, root: Path) -> tuple[str, bool]:
    """(gguf arch name, permute q/k) for a config; refuses 4-bit checkpoints and other architectures."""
    spec = arch_spec(raw_config, root)
    return spec.gguf_arch, spec.permute_qk


def _plan(gguf, checkpoint, config: dict, spec: ArchSpec, out_type: str):
    """[(hf key or generated array, gguf name, GGML type)] from the safetensors headers; no tensor data read."""
    arch = getattr(gguf.MODEL_ARCH, spec.gguf_arch)
    name_map = gguf.get_tensor_name_map(arch, config["num_hidden_layers"])
    weight_type = getattr(gguf.GGMLQuantizationType, _TYPES[out_type][0])
    plan = []
    for key in checkpoint.keys():  # noqa: SIM118 (a Checkpoint, not a dict)
        if key.endswith(".rotary_emb.inv_freq"):
            continue
        name = name_map.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise GGUFExportError(f"{checkpoint.infos[key].file}: tensor '{key}' has no GGUF name "
                                  f"for {spec.gguf_arch.lower()}")
        shape = checkpoint.infos[key].shape
        qtype = gguf.GGMLQuantizationType.F32 if len(shape) <= 1 else weight_type
        if out_type in ("q8_0", "q4_0") and len(shape) > 1 and shape[-1] % 32 != 0:
            qtype = gguf.GGMLQuantizationType.F16
        plan.append((key, name, qtype))
    if rope_settings(config)["type"] == "llama3":
        plan.insert(0, (llama3_rope_factors(config), gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight",
                        gguf.GGMLQuantizationType.F32))
    return plan


def _source_array(checkpoint, key, config: dict, spec: ArchSpec) -> np.ndarray:
    """The source tensor in float32 as llama.cpp reads it: q/k rows permuted, Gemma norms shifted."""
    if isinstance(key, np.ndarray):  # generated (rope_freqs)
        return key
    value = checkpoint.get(key).float()
    if spec.permute_qk and key.endswith(("self_attn.q_proj.weight", "self_attn.q_proj.bias")):
        value = llama_permute(value, config["num_attention_heads"], config["num_attention_heads"])
    elif spec.permute_qk and key.endswith(("self_attn.k_proj.weight", "self_attn.k_proj.bias")):
        value = llama_permute(value, config["num_attention_heads"], config.get("num_key_value_heads"))
    elif spec.norm_shift and key.endswith("norm.weight"):
        value = value + spec.norm_shift
    return value.numpy()


def _encode(gguf, data: np.ndarray, qtype) -> np.ndarray:
    T = gguf.GGMLQuantizationType
    if qtype == T.F32:
        return np.ascontiguousarray(data, dtype=np.float32)
    if qtype == T.F16:
        return np.ascontiguousarray(data, dtype=np.float16)
    return gguf.quants.quantize(data, qtype)


def _add_tensor_info(writer, gguf, name: str, shape: tuple, qtype) -> None:
    """Declare one tensor in the header, with the byte size its GGML type takes."""
    T = gguf.GGMLQuantizationType
    if qtype in (T.F32, T.F16):
        dtype = np.dtype(np.float32 if qtype == T.F32 else np.float16)
        writer.add_tensor_info(name, shape, dtype, int(np.prod(shape)) * dtype.itemsize)
    elif qtype == T.BF16:
        writer.add_tensor_info(name, shape, np.dtype(np.uint16), int(np.prod(shape)) * 2, raw_dtype=qtype)
    else:
        byte_shape = gguf.quants.quant_shape_to_byte_shape(shape, qtype)
        writer.add_tensor_info(name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=qtype)


def export_gguf(model: str | os.PathLike, out: str | os.PathLike, out_type: str = "f16",
                overwrite: bool = False, name: str | None = None, tokenizer_pre: str | None = None) -> GGUFReport:
    """Write `model` (a plain safetensors directory of a family in ARCHITECTURES) as GGUF, read it back, check it.

    `tokenizer_pre` overrides the llama.cpp pre-tokenizer name detected from a byte-level BPE tokenizer.json.
    """
    gguf = _import_gguf()
    root, out = Path(model), Path(out)
    if out_type not in OUT_TYPES:
        raise NibbletuneError(f"GGUF type must be one of {OUT_TYPES}, got {out_type!r}")
    config = read_config_json(root)
    spec = arch_spec(config, root)
    warn_sliding_window(config, spec, root)
    checkpoint = open_checkpoint(root)
    with checkpoint, staged_output(out, overwrite, is_dir=False) as staging:
        plan = _plan(gguf, checkpoint, config, spec, out_type)
        writer = gguf.GGUFWriter(str(staging), gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, spec.gguf_arch)])
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(name or root.resolve().name)
        spec.hparams(writer, gguf, config)
        writer.add_file_type(int(getattr(gguf.LlamaFileType, _TYPES[out_type][1])))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        write_tokenizer(writer, gguf, root, config["vocab_size"], tokenizer_pre)
        for key, gguf_name, qtype in plan:
            shape = key.shape if isinstance(key, np.ndarray) else tuple(checkpoint.infos[key].shape)
            _add_tensor_info(writer, gguf, gguf_name, shape, qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for key, _, qtype in plan:
            writer.write_tensor_data(_encode(gguf, _source_array(checkpoint, key, config, spec), qtype))
        writer.close()
        max_rel = verify_gguf(gguf, staging, checkpoint, plan, config, spec, out_type)
        file_bytes = staging.stat().st_size
    return GGUFReport(out, spec.gguf_arch.lower(), out_type, len(plan), file_bytes, max_rel)


def verify_gguf(gguf, path: Path, checkpoint, plan, config: dict, spec: ArchSpec, out_type: str) -> float:
    """Read `path` back and compare each tensor with its source; return the worst relative error."""
    reader = gguf.GGUFReader(str(path))
    by_name = {t.name: t for t in reader.tensors}
    if len(by_name) != len(plan):
        raise GGUFExportError(f"{path}: holds {len(by_name)} tensors, expected {len(plan)}")
    worst = 0.0
    for key, gguf_name, qtype in plan:
        tensor = by_name.get(gguf_name)
        if tensor is None:
            raise GGUFExportError(f"{path}: tensor '{gguf_name}' is missing")
        if tensor.tensor_type != qtype:
            raise GGUFExportError(f"{path}: tensor '{gguf_name}' has type {tensor.tensor_type.name}, expected {qtype.name}")
        source = _source_array(checkpoint, key, config, spec)
        restored = gguf.quants.dequantize(np.asarray(tensor.data), qtype).reshape(source.shape)
        scale = float(np.abs(source).max()) or 1.0
        rel = float(np.abs(restored.astype(np.float32) - source).max()) / scale
        limit = 0.0 if qtype == gguf.GGMLQuantizationType.F32 else (
            1e-3 if qtype == gguf.GGMLQuantizationType.F16 else _TYPES[out_type][2])
        if rel > limit:
            raise GGUFExportError(
                f"{path}: tensor '{gguf_name}' read back with max error {rel:.3g} x max|w| (limit {limit:g} for {qtype.name})"
            )
        worst = max(worst, rel)
    return worst
