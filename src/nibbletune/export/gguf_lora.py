"""export_gguf_lora: a PEFT LoRA adapter -> a llama.cpp GGUF LoRA adapter (convert_lora_to_gguf.py layout).

The file has general.type "adapter", adapter.type "lora", adapter.lora.alpha, and for each
target linear, under the base tensor's GGUF name, `<name>.lora_a` (r x in) and `<name>.lora_b`
(out x r). llama.cpp scales by alpha / r; an rsLoRA adapter (alpha / sqrt(r)) is written with
alpha * sqrt(r) so the product is unchanged. The Llama q/k row permutation acts on the output
rows only, so it is applied to lora_b. DoRA has no llama.cpp equivalent and is refused.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..loading import read_adapter
from ..loading.adapter_files import check_adapter_fits, linear_shapes
from ..loading.skeleton import skeleton_from_dir
from .atomic import staged_output
from .gguf_export import GGUFExportError, _import_gguf, llama_permute, model_arch
from .quantize_checkpoint import read_config_json

LORA_TYPES = ("f32", "f16", "bf16", "q8_0")


@dataclass
class GGUFLoraReport:
    """What `export_gguf_lora` wrote."""

    out: Path
    arch: str
    out_type: str
    tensors: int
    file_bytes: int


def _lora_tensors(adapter, config: dict, permute: bool, name_map) -> list[tuple[str, torch.Tensor]]:
    """[(gguf name, float32 tensor)] in module order: `<base>.lora_a`, `<base>.lora_b`."""
    tensors = []
    n_head = config["num_attention_heads"]
    for module, pair in adapter.modules.items():
        base_name = name_map.get_name(f"{module}.weight", try_suffixes=(".weight",))
        if base_name is None:
            raise GGUFExportError(f"{adapter.path}: target '{module}' has no GGUF tensor name")
        lora_b = pair.lora_B
        if permute and module.endswith("self_attn.q_proj"):
            lora_b = llama_permute(lora_b, n_head, n_head)
        elif permute and module.endswith("self_attn.k_proj"):
            lora_b = llama_permute(lora_b, n_head, config.get("num_key_value_heads"))
        tensors.append((f"{base_name}.lora_a", pair.lora_A.contiguous()))
        tensors.append((f"{base_name}.lora_b", lora_b.contiguous()))
    return tensors


def export_gguf_lora(adapter_dir: str | os.PathLike, out: str | os.PathLike, base: str | os.PathLike,
                     out_type: str = "f32", overwrite: bool = False) -> GGUFLoraReport:
    """Write the adapter as a GGUF LoRA for llama.cpp (`--lora`), read it back and check it."""
    gguf = _import_gguf()
    if out_type not in LORA_TYPES:
        raise GGUFExportError(f"GGUF LoRA type must be one of {LORA_TYPES}, got {out_type!r}")
    base = Path(base)
    config = read_config_json(base)
    config.pop("quantization_config", None)  # the adapter only needs the base's shapes and names
    arch_name, permute = model_arch(config, base)
    adapter = read_adapter(adapter_dir)
    lora = adapter.settings
    if lora.use_dora:
        raise GGUFExportError(f"{adapter.path}: DoRA adapters cannot be expressed as a llama.cpp LoRA; merge and export instead")
    skeleton = skeleton_from_dir(base)
    check_adapter_fits(adapter, linear_shapes(skeleton), base)
    arch = getattr(gguf.MODEL_ARCH, arch_name)
    tensors = _lora_tensors(adapter, config, permute, gguf.get_tensor_name_map(arch, config["num_hidden_layers"]))
    alpha = lora.alpha * math.sqrt(lora.r) if lora.use_rslora else lora.alpha
    T = gguf.GGMLQuantizationType
    with staged_output(out, overwrite, is_dir=False) as staging:
        writer = gguf.GGUFWriter(str(staging), gguf.MODEL_ARCH_NAMES[arch])
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
        writer.add_name(Path(adapter_dir).resolve().name)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        written = []
        for name, value in tensors:
            data = value.float().numpy()
            qtype = {"f32": T.F32, "f16": T.F16, "bf16": T.BF16, "q8_0": T.Q8_0}[out_type]
            if qtype == T.Q8_0 and data.shape[-1] % 32 != 0:
                qtype = T.F16  # convert_hf_to_gguf's fallback for rows that do not fill a block
            if qtype == T.F32:
                writer.add_tensor(name, np.ascontiguousarray(data))
            elif qtype == T.F16:
                writer.add_tensor(name, data.astype(np.float16))
            else:
                writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
            written.append((name, data, qtype))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        _check(gguf, staging, written)
        file_bytes = staging.stat().st_size
    return GGUFLoraReport(Path(out), arch_name.lower(), out_type, len(written), file_bytes)


def _check(gguf, path: Path, written) -> None:
    reader = gguf.GGUFReader(str(path))
    by_name = {t.name: t for t in reader.tensors}
    if reader.fields["adapter.type"].contents() != "lora" or len(by_name) != len(written):
        raise GGUFExportError(f"{path}: read back a malformed LoRA adapter")
    for name, data, qtype in written:
        t = by_name.get(name)
        if t is None or t.tensor_type != qtype:
            raise GGUFExportError(f"{path}: tensor '{name}' missing or of the wrong type on read-back")
        restored = gguf.quants.dequantize(np.asarray(t.data), qtype).reshape(data.shape)
        limit = {"F32": 0.0, "F16": 1e-3, "BF16": 8e-3, "Q8_0": 1.1e-2}[qtype.name]
        scale = float(np.abs(data).max()) or 1.0
        if float(np.abs(restored - data).max()) > limit * scale:
            raise GGUFExportError(f"{path}: tensor '{name}' read back with an error above {limit:g} x max|w|")
