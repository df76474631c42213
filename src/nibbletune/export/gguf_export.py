"""export_gguf: a merged (plain) Llama / Mistral / Qwen2 checkpoint -> one llama.cpp GGUF file.

Names, metadata and layout follow llama.cpp's `convert_hf_to_gguf.py`:
- tensor names from `gguf.get_tensor_name_map(arch, n_layers)` (model.layers.3.self_attn.q_proj
  -> blk.3.attn_q.weight); rotary inv_freq buffers are not exported;
- Llama and Mistral (both the "llama" architecture in llama.cpp) store q_proj/k_proj rows
  permuted from HF's rotate-half order to llama.cpp's interleaved order:
  W.reshape(n_head, 2, rows // n_head // 2, cols).swapaxes(1, 2).reshape(rows, cols)
  (n_head = num_key_value_heads for k_proj). Qwen2 uses neox rope: no permute;
- 1-D tensors (norms, biases) stay F32; 2-D tensors take the requested type; q8_0/q4_0 rows
  that are not a multiple of 32 fall back to F16, as convert_hf_to_gguf does;
- hyperparameters under `<arch>.*` (rope: default, linear scaling, or Llama 3.1 "llama3" as a
  `rope_freqs.weight` tensor; other rope types are refused);
- a byte-level BPE tokenizer.json as tokenizer.ggml.model "gpt2" with tokens, token types,
  merges, special ids and the chat template (`gguf.SpecialVocab`), and `tokenizer.ggml.pre`
  detected from the pre-tokenizer regex ("gpt-2", "llama-bpe", "qwen2"; others must be named).
  Tokenizers that llama.cpp reads as SentencePiece ("llama" model with scores) are refused.

The file is written in two passes over the checkpoint (header from the safetensors headers,
then one tensor at a time), into a staging file renamed at the end, after it has been read back
with `gguf.GGUFReader` and compared tensor by tensor with the source.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import NibbletuneError
from ..loading.safetensors_io import open_checkpoint
from .atomic import staged_output
from .quantize_checkpoint import read_config_json

logger = logging.getLogger(__name__)

# HF architecture -> (gguf arch name, permute q/k)
ARCHITECTURES = {
    "LlamaForCausalLM": ("LLAMA", True),
    "MistralForCausalLM": ("LLAMA", True),
    "Qwen2ForCausalLM": ("QWEN2", False),
}
OUT_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")
# out type -> (GGML type of 2-D weights, general.file_type, max |err| / max |x| accepted on read-back)
_TYPES = {
    "f32": ("F32", "ALL_F32", 0.0),
    "f16": ("F16", "MOSTLY_F16", 1e-3),
    "bf16": ("BF16", "MOSTLY_BF16", 8e-3),
    "q8_0": ("Q8_0", "MOSTLY_Q8_0", 1.0 / 127 + 1e-3),
    "q4_0": ("Q4_0", "MOSTLY_Q4_0", 1.0 / 7 + 1e-2),
}


class GGUFExportError(NibbletuneError):
    """A model GGUF export cannot handle, or a written file that does not match its source."""


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
    if raw_config.get("quantization_config"):
        raise GGUFExportError(
            f"{root}: is a 4-bit checkpoint; export a merged 16/32-bit model (`nibbletune merge`) instead"
        )
    archs = raw_config.get("architectures") or []
    for arch in archs:
        if arch in ARCHITECTURES:
            return ARCHITECTURES[arch]
    raise GGUFExportError(f"{root}: architecture {archs or raw_config.get('model_type')} is not supported "
                          f"for GGUF export (supported: {', '.join(ARCHITECTURES)})")


# tokenizer.json pre-tokenizer regex -> llama.cpp's tokenizer.ggml.pre (llama-vocab.cpp).
_GPT2_REGEX = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
PRE_TOKENIZER_REGEXES = {
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""":
        "llama-bpe",
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""":
        "qwen2",
    _GPT2_REGEX: "gpt-2",
}


def rope_settings(config: dict) -> dict:
    """{"theta", "type" ("default" | "linear" | "llama3"), and the type's parameters} from an HF config."""
    rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    rope.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type")) or "default"
    if rope_type not in ("default", "linear", "llama3"):
        raise GGUFExportError(f"rope type {rope_type!r} is not supported for GGUF export (default, linear, llama3)")
    return {**rope, "type": rope_type, "theta": float(rope["rope_theta"])}


def llama3_rope_factors(config: dict) -> np.ndarray:
    """The `rope_freqs.weight` tensor for Llama 3.1-style rope (convert_hf_to_gguf LlamaModel)."""
    rope = rope_settings(config)
    dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    freqs = 1.0 / rope["theta"] ** (np.arange(0, dim, 2, dtype=np.float32) / dim)
    factor, low, high = rope.get("factor", 8.0), rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_ctx = rope.get("original_max_position_embeddings", 8192)
    factors = []
    for freq in freqs:
        wavelen = 2 * np.pi / freq
        if wavelen < old_ctx / high:
            factors.append(1.0)
        elif wavelen > old_ctx / low:
            factors.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(factors, dtype=np.float32)


def _hparams(writer, gguf, config: dict, file_type: int) -> None:
    """The `<arch>.*` keys convert_hf_to_gguf writes for Llama / Qwen2 (TextModel.set_gguf_parameters)."""
    n_head = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // n_head
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config.get("max_position_embeddings", 2048))
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(config.get("num_key_value_heads") or n_head)
    rope = rope_settings(config)
    writer.add_rope_freq_base(rope["theta"])
    if rope["type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    writer.add_layer_norm_rms_eps(config.get("rms_norm_eps", 1e-6))
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_file_type(file_type)
    writer.add_vocab_size(config["vocab_size"])
    writer.add_rope_dimension_count(head_dim)


def detect_tokenizer_pre(tokenizer_json: dict, path: Path) -> str:
    """llama.cpp's `tokenizer.ggml.pre` for a byte-level BPE tokenizer.json, from its pre-tokenizer.

    convert_hf_to_gguf identifies the pre-tokenizer by hashing a sample's tokenization; we read the
    regex instead. A ByteLevel pre-tokenizer with its own (GPT-2) regex is llama.cpp's "gpt-2";
    a Split with the Llama 3 / Qwen2 regex followed by ByteLevel is "llama-bpe" / "qwen2".
    """
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [step.get("type") for step in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        regex = steps[0].get("pattern", {}).get("Regex")
        if regex in PRE_TOKENIZER_REGEXES:
            return PRE_TOKENIZER_REGEXES[regex]
    raise GGUFExportError(f"{path}: pre-tokenizer {kinds or 'none'} has no known llama.cpp equivalent "
                          f"(supported: byte-level BPE as GPT-2, Llama 3, Qwen2); name one with --tokenizer-pre")


def _tokenizer(writer, gguf, root: Path, vocab_size: int, pre: str | None = None) -> bool:
    """GPT-2 style BPE vocabulary (convert_hf_to_gguf `_set_vocab_gpt2`); False when there is no tokenizer.

    Read from tokenizer.json with the `tokenizers` library, not AutoTokenizer: transformers may
    rebuild a tokenizer from the model type (e.g. a Qwen2 class adding tokens), while llama.cpp
    must get exactly what the file holds. Ids up to vocab_size without a token are "[PAD<id>]".
    """
    import json

    from tokenizers import Tokenizer

    path = root / "tokenizer.json"
    if not path.is_file():
        return False
    tokenizer_json = json.loads(path.read_text(encoding="utf-8"))
    if (tokenizer_json.get("model") or {}).get("type") != "BPE":
        raise GGUFExportError(f"{path}: only BPE tokenizers are supported for GGUF export")
    pre = pre or detect_tokenizer_pre(tokenizer_json, path)
    tokenizer = Tokenizer.from_file(str(path))
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    if max(vocab.values()) >= vocab_size:
        raise GGUFExportError(f"{path}: tokenizer has ids up to {max(vocab.values())} but vocab_size is {vocab_size}")
    reverse = {i: t for t, i in vocab.items()}
    added = tokenizer.get_added_tokens_decoder()
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(root, load_merges=True, n_vocab=len(tokens))
    special.add_to_gguf(writer)
    return True


def _plan(gguf, checkpoint, config: dict, arch_name: str, out_type: str):
    """[(hf key or generated array, gguf name, GGML type)] from the safetensors headers; no tensor data read."""
    arch = getattr(gguf.MODEL_ARCH, arch_name)
    name_map = gguf.get_tensor_name_map(arch, config["num_hidden_layers"])
    weight_type = getattr(gguf.GGMLQuantizationType, _TYPES[out_type][0])
    plan = []
    for key in checkpoint.keys():  # noqa: SIM118 (a Checkpoint, not a dict)
        if key.endswith(".rotary_emb.inv_freq"):
            continue
        name = name_map.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise GGUFExportError(f"{checkpoint.infos[key].file}: tensor '{key}' has no GGUF name for {arch_name.lower()}")
        shape = checkpoint.infos[key].shape
        qtype = gguf.GGMLQuantizationType.F32 if len(shape) <= 1 else weight_type
        if out_type in ("q8_0", "q4_0") and len(shape) > 1 and shape[-1] % 32 != 0:
            qtype = gguf.GGMLQuantizationType.F16
        plan.append((key, name, qtype))
    if rope_settings(config)["type"] == "llama3":
        plan.insert(0, (llama3_rope_factors(config), gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight",
                        gguf.GGMLQuantizationType.F32))
    return plan


def _source_array(checkpoint, key, config: dict, permute: bool) -> np.ndarray:
    """The source tensor in float32, q/k rows permuted as llama.cpp expects."""
    if isinstance(key, np.ndarray):  # generated (rope_freqs)
        return key
    value = checkpoint.get(key).float()
    if permute and key.endswith(("self_attn.q_proj.weight", "self_attn.q_proj.bias")):
        value = llama_permute(value, config["num_attention_heads"], config["num_attention_heads"])
    elif permute and key.endswith(("self_attn.k_proj.weight", "self_attn.k_proj.bias")):
        value = llama_permute(value, config["num_attention_heads"], config.get("num_key_value_heads"))
    return value.numpy()


def _encode(gguf, data: np.ndarray, qtype) -> np.ndarray:
    T = gguf.GGMLQuantizationType
    if qtype == T.F32:
        return np.ascontiguousarray(data, dtype=np.float32)
    if qtype == T.F16:
        return np.ascontiguousarray(data, dtype=np.float16)
    return gguf.quants.quantize(data, qtype)


def export_gguf(model: str | os.PathLike, out: str | os.PathLike, out_type: str = "f16",
                overwrite: bool = False, name: str | None = None, tokenizer_pre: str | None = None) -> GGUFReport:
    """Write `model` (a plain Llama/Mistral/Qwen2 safetensors directory) as GGUF, read it back, check it.

    `tokenizer_pre` overrides the llama.cpp pre-tokenizer name detected from tokenizer.json.
    """
    gguf = _import_gguf()
    root, out = Path(model), Path(out)
    if out_type not in OUT_TYPES:
        raise NibbletuneError(f"GGUF type must be one of {OUT_TYPES}, got {out_type!r}")
    config = read_config_json(root)
    arch_name, permute = model_arch(config, root)
    window = config.get("sliding_window")
    if window and config.get("use_sliding_window", True) and window < config.get("max_position_embeddings", 0):
        logger.warning("%s: sliding_window=%d is not stored in GGUF (llama.cpp attends to the whole context, "
                       "as convert_hf_to_gguf does); outputs differ past %d tokens", root, window, window)
    checkpoint = open_checkpoint(root)
    with checkpoint, staged_output(out, overwrite, is_dir=False) as staging:
        plan = _plan(gguf, checkpoint, config, arch_name, out_type)
        writer = gguf.GGUFWriter(str(staging), gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, arch_name)])
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(name or root.resolve().name)
        _hparams(writer, gguf, config, int(getattr(gguf.LlamaFileType, _TYPES[out_type][1])))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _tokenizer(writer, gguf, root, config["vocab_size"], tokenizer_pre)
        for key, gguf_name, qtype in plan:
            shape = key.shape if isinstance(key, np.ndarray) else tuple(checkpoint.infos[key].shape)
            if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
                dtype = np.float32 if qtype == gguf.GGMLQuantizationType.F32 else np.float16
                writer.add_tensor_info(gguf_name, shape, np.dtype(dtype), int(np.prod(shape)) * np.dtype(dtype).itemsize)
            elif qtype == gguf.GGMLQuantizationType.BF16:
                writer.add_tensor_info(gguf_name, shape, np.dtype(np.uint16), int(np.prod(shape)) * 2, raw_dtype=qtype)
            else:
                byte_shape = gguf.quants.quant_shape_to_byte_shape(shape, qtype)
                writer.add_tensor_info(gguf_name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for key, _, qtype in plan:
            writer.write_tensor_data(_encode(gguf, _source_array(checkpoint, key, config, permute), qtype))
        writer.close()
        max_rel = verify_gguf(gguf, staging, checkpoint, plan, config, permute, out_type)
        file_bytes = staging.stat().st_size
    return GGUFReport(out, arch_name.lower(), out_type, len(plan), file_bytes, max_rel)


def verify_gguf(gguf, path: Path, checkpoint, plan, config: dict, permute: bool, out_type: str) -> float:
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
        source = _source_array(checkpoint, key, config, permute)
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
