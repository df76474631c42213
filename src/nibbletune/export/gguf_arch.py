"""What llama.cpp expects of each model family GGUF export handles: architecture, rope, `<arch>.*` keys.

Each family follows llama.cpp's `convert_hf_to_gguf.py` (the class named in its `ArchSpec`) and the
model's loader in llama.cpp (`src/models/<arch>.cpp`):

- Llama, Mistral ("llama"): q/k rows permuted to llama.cpp's interleaved rope (`llama_permute`);
- Qwen2, Qwen3 ("qwen2", "qwen3"): neox rope, HF layout; Qwen3 adds per-head q/k RMS norms;
- Gemma 3 text ("gemma3"): neox rope; every `*norm.weight` is stored plus 1 (HF computes
  x * (1 + w), llama.cpp x * w); sliding-window layers use their own rope base
  (`rope.freq_base_swa`) and llama.cpp's layer pattern (every 6th layer global) unless
  `sliding_window_pattern` says otherwise; embeddings are scaled by sqrt(hidden) at run time;
- Phi-3 ("phi3"): neox rope, fused `attn_qkv` and `ffn_up` (gate rows first), partial rotary
  dims in `rope.dimension_count`; llama.cpp runs Phi-3 without its sliding window.

Config values llama.cpp would silently compute differently (rope types, Gemma's query scale,
activations) are refused here with one line naming the key.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import NibbletuneError

logger = logging.getLogger(__name__)


class GGUFExportError(NibbletuneError):
    """A model GGUF export cannot handle, or a written file that does not match its source."""


@dataclass(frozen=True)
class ArchSpec:
    """How one HF architecture is written as GGUF."""

    gguf_arch: str  # gguf.MODEL_ARCH member name
    permute_qk: bool  # q/k rows to llama.cpp's interleaved rope order
    norm_shift: float  # added to every `*norm.weight` (Gemma's 1 + w norms)
    activation: str  # the only HF hidden activation llama.cpp's graph for this arch computes
    hparams: Callable  # (writer, gguf, config) -> None: the `<arch>.*` keys


def rope_settings(config: dict, layer_type: str = "full_attention") -> dict:
    """{"theta", "type" ("default" | "linear" | "llama3"), and the type's parameters} from an HF config.

    Reads transformers 5's `rope_parameters` (per layer type for Gemma 3) or the older
    `rope_theta` / `rope_scaling` / `rope_local_base_freq` keys.
    """
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if layer_type in rope or "full_attention" in rope:
        rope = rope.get(layer_type, {})
    rope = dict(rope)
    if layer_type == "sliding_attention" and "rope_theta" not in rope:
        rope = {"rope_theta": config.get("rope_local_base_freq", 10000.0)}  # older Gemma 3 configs
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


def head_dim(config: dict) -> int:
    """Per-head width: `head_dim`, else hidden_size / num_attention_heads."""
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def _common_hparams(writer, gguf, config: dict) -> None:
    """The keys convert_hf_to_gguf's TextModel (and LlamaModel) writes for every family here."""
    n_head = config["num_attention_heads"]
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
    writer.add_key_length(head_dim(config))
    writer.add_value_length(head_dim(config))


def _llama_hparams(writer, gguf, config: dict) -> None:
    """Llama, Mistral, Qwen2, Qwen3: the common keys plus vocab size and rope dimensions."""
    _common_hparams(writer, gguf, config)
    writer.add_vocab_size(config["vocab_size"])
    writer.add_rope_dimension_count(head_dim(config))


def gemma3_layer_types(config: dict) -> list[str]:
    """"sliding_attention" / "full_attention" per layer: `layer_types`, else `sliding_window_pattern` (default 6)."""
    if config.get("layer_types"):
        return list(config["layer_types"])
    pattern = config.get("sliding_window_pattern") or config.get("_sliding_window_pattern") or 6
    return ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
            for i in range(config["num_hidden_layers"])]


def _gemma3_hparams(writer, gguf, config: dict) -> None:
    """convert_hf_to_gguf Gemma3Model: common keys, sliding window, the local rope base, logit softcap."""
    if config.get("attn_logit_softcapping") is not None:
        raise GGUFExportError("attn_logit_softcapping is set: Gemma 3 in llama.cpp has no attention softcap")
    n_layer, dim = config["num_hidden_layers"], head_dim(config)
    # llama.cpp scales queries by 1/sqrt(head_dim), or 1/sqrt(hidden/heads) for its 62-layer (27B) Gemma 3
    llama_cpp_scalar = config["hidden_size"] // config["num_attention_heads"] if n_layer == 62 else dim
    if config.get("query_pre_attn_scalar", dim) != llama_cpp_scalar:
        raise GGUFExportError(f"query_pre_attn_scalar={config['query_pre_attn_scalar']} but llama.cpp scales "
                              f"Gemma 3 queries by 1/sqrt({llama_cpp_scalar})")
    local_rope = rope_settings(config, "sliding_attention")
    if local_rope["type"] != "default":
        raise GGUFExportError(f"sliding_attention rope type {local_rope['type']!r}: llama.cpp runs Gemma 3's "
                              "local layers with unscaled rope")
    _common_hparams(writer, gguf, config)
    layer_types = gemma3_layer_types(config)
    if "sliding_attention" in layer_types:
        writer.add_sliding_window(config["sliding_window"])
        writer.add_rope_freq_base_swa(local_rope["theta"])
        llama_cpp_default = [i % 6 < 5 for i in range(n_layer)]
        is_sliding = [t == "sliding_attention" for t in layer_types]
        if is_sliding != llama_cpp_default:
            writer.add_sliding_window_pattern(is_sliding)
    if config.get("final_logit_softcapping"):
        writer.add_final_logit_softcapping(float(config["final_logit_softcapping"]))


def _phi3_hparams(writer, gguf, config: dict) -> None:
    """convert_hf_to_gguf Phi3MiniModel: no key_length (llama.cpp takes hidden / heads), rope dims, window."""
    n_embd, n_head = config["hidden_size"], config["num_attention_heads"]
    if head_dim(config) != n_embd // n_head:
        raise GGUFExportError(f"head_dim={config['head_dim']}: llama.cpp's Phi-3 uses hidden_size / heads")
    rope = rope_settings(config)
    if rope["type"] != "default":
        raise GGUFExportError(f"rope type {rope['type']!r} is not supported for Phi-3 GGUF export (default)")
    rotary = rope.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_rope_scaling_orig_ctx_len(config.get("original_max_position_embeddings")
                                         or config["max_position_embeddings"])
    writer.add_embedding_length(n_embd)
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(config.get("num_key_value_heads") or n_head)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_dimension_count(int(rotary * n_embd) // n_head)
    writer.add_rope_freq_base(rope["theta"])
    writer.add_sliding_window(config.get("sliding_window") or 0)


ARCHITECTURES = {
    "LlamaForCausalLM": ArchSpec("LLAMA", True, 0.0, "silu", _llama_hparams),
    "MistralForCausalLM": ArchSpec("LLAMA", True, 0.0, "silu", _llama_hparams),
    "Qwen2ForCausalLM": ArchSpec("QWEN2", False, 0.0, "silu", _llama_hparams),
    "Qwen3ForCausalLM": ArchSpec("QWEN3", False, 0.0, "silu", _llama_hparams),
    "Gemma3ForCausalLM": ArchSpec("GEMMA3", False, 1.0, "gelu_pytorch_tanh", _gemma3_hparams),
    "Phi3ForCausalLM": ArchSpec("PHI3", False, 0.0, "silu", _phi3_hparams),
}


def arch_spec(raw_config: dict, root: Path) -> ArchSpec:
    """The ArchSpec of a config; refuses 4-bit checkpoints, other architectures and other activations."""
    if raw_config.get("quantization_config"):
        raise GGUFExportError(
            f"{root}: is a 4-bit checkpoint; export a merged 16/32-bit model (`nibbletune merge`) instead"
        )
    archs = raw_config.get("architectures") or []
    spec = next((ARCHITECTURES[arch] for arch in archs if arch in ARCHITECTURES), None)
    if spec is None:
        raise GGUFExportError(f"{root}: architecture {archs or raw_config.get('model_type')} is not supported "
                              f"for GGUF export (supported: {', '.join(ARCHITECTURES)})")
    activation = raw_config.get("hidden_act") or raw_config.get("hidden_activation") or spec.activation
    if activation != spec.activation:
        raise GGUFExportError(f"{root}/config.json: activation {activation!r}, but llama.cpp's "
                              f"{spec.gguf_arch.lower()} computes {spec.activation!r}")
    return spec


def warn_sliding_window(config: dict, spec: ArchSpec, root: Path) -> None:
    """Say so when HF attends through a window that llama.cpp will not apply (all but Gemma 3)."""
    if spec.gguf_arch == "GEMMA3":
        return  # gemma3.attention.sliding_window, applied per layer
    window = config.get("sliding_window")
    if window and config.get("use_sliding_window", True) and window < config.get("max_position_embeddings", 0):
        logger.warning("%s: sliding_window=%d is not applied by llama.cpp's %s (it attends to the whole context, "
                       "as convert_hf_to_gguf writes it); outputs differ past %d tokens",
                       root, window, spec.gguf_arch.lower(), window)
