"""A pure-torch Llama-family forward that reads ONLY a GGUF file, the way llama.cpp does.

It knows nothing about Hugging Face: hyperparameters come from the `<arch>.*` metadata keys,
weights from llama.cpp's tensor names (`token_embd`, `blk.N.attn_q`, ...), quantized tensors
are dequantized with `gguf.quants.dequantize`, and rotary embeddings follow llama.cpp's
per-architecture rope mode:

- "llama" (Llama, Mistral) uses LLAMA_ROPE_TYPE_NORM: rotate adjacent pairs (2i, 2i+1). HF
  rotates (i, i + d/2), so an exporter must have permuted q/k rows (convert_hf_to_gguf's
  `permute`) for this forward to match HF logits;
- "qwen2" uses LLAMA_ROPE_TYPE_NEOX: rotate (i, i + d/2), the HF layout, no permutation.

A wrong tensor name, a missing/wrong hyperparameter or a wrong q/k layout shows up as logits that
disagree with the transformers model the file came from.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

NEOX_ROPE_ARCHS = {"qwen2"}


@dataclass
class GGUFModel:
    """Hyperparameters and float32 tensors of one GGUF model file."""

    arch: str
    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_rot: int
    rope_base: float
    rope_scale: float  # llama.cpp freq_scale: 1 / rope.scaling.factor for "linear", else 1
    rms_eps: float
    n_ctx_train: int
    tensors: dict[str, torch.Tensor]
    fields: dict


def field(reader, key: str, default=None):
    """A metadata value (scalar, string or list), or `default` when the key is absent."""
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def dequantized(tensor) -> torch.Tensor:
    """A ReaderTensor as float32, in numpy (row-major, HF) shape."""
    import gguf

    data = gguf.quants.dequantize(np.asarray(tensor.data), tensor.tensor_type)
    shape = tuple(int(n) for n in reversed(tensor.shape))  # ggml ne is fastest-first
    return torch.from_numpy(np.array(data, dtype=np.float32).reshape(shape))


def read_gguf_model(path) -> GGUFModel:
    """Parse `path` with gguf.GGUFReader; required keys missing raise KeyError naming them."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    arch = field(reader, "general.architecture")

    def req(key):
        value = field(reader, f"{arch}.{key}")
        if value is None:
            raise KeyError(f"{path}: missing required metadata key {arch}.{key}")
        return value

    n_embd, n_head = int(req("embedding_length")), int(req("attention.head_count"))
    head_dim = int(field(reader, f"{arch}.attention.key_length", n_embd // n_head))
    return GGUFModel(
        arch=arch, n_layer=int(req("block_count")), n_embd=n_embd, n_ff=int(req("feed_forward_length")),
        n_head=n_head, n_head_kv=int(field(reader, f"{arch}.attention.head_count_kv", n_head)),
        head_dim=head_dim, n_rot=int(field(reader, f"{arch}.rope.dimension_count", head_dim)),
        rope_base=float(field(reader, f"{arch}.rope.freq_base", 10000.0)),
        rope_scale=1.0 / float(field(reader, f"{arch}.rope.scaling.factor", 1.0))
        if field(reader, f"{arch}.rope.scaling.type", "none") == "linear" else 1.0,
        rms_eps=float(req("attention.layer_norm_rms_epsilon")), n_ctx_train=int(req("context_length")),
        tensors={t.name: dequantized(t) for t in reader.tensors},
        fields={k: f for k, f in reader.fields.items()},
    )


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _rope(x: torch.Tensor, model: GGUFModel, neox: bool) -> torch.Tensor:
    """x: (T, H, D). Rotate the first n_rot dims by position, llama.cpp NORM or NEOX pairing.

    llama.cpp's angle for pair i at position p: p * freq_scale * base^(-2i/n_rot) / rope_freqs[i].
    """
    T, n_rot = x.shape[0], model.n_rot
    inv_freq = model.rope_base ** (-torch.arange(0, n_rot, 2, dtype=torch.float64) / n_rot)  # (n_rot/2,)
    if "rope_freqs.weight" in model.tensors:
        inv_freq = inv_freq / model.tensors["rope_freqs.weight"].double()
    angle = model.rope_scale * torch.arange(T, dtype=torch.float64)[:, None] * inv_freq[None, :]  # (T, n_rot/2)
    cos, sin = angle.cos().float()[:, None, :], angle.sin().float()[:, None, :]  # (T, 1, n_rot/2)
    rot, rest = x[..., :n_rot], x[..., n_rot:]
    if neox:
        a, b = rot[..., : n_rot // 2], rot[..., n_rot // 2:]
        rotated = torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1)
    else:
        a, b = rot[..., 0::2], rot[..., 1::2]
        rotated = torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)
    return torch.cat([rotated, rest], dim=-1)


def _linear(t: dict, name: str, x: torch.Tensor) -> torch.Tensor:
    y = x @ t[f"{name}.weight"].T
    bias = t.get(f"{name}.bias")
    return y if bias is None else y + bias


def forward(model: GGUFModel, tokens: list[int], loras: dict[str, tuple] | None = None) -> torch.Tensor:
    """Logits (T, n_vocab) for one causal sequence starting at position 0.

    `loras` maps a base tensor name (`blk.0.attn_q.weight`) to (lora_a, lora_b, scale): the
    forward then adds scale * (x @ A.T) @ B.T to that projection, as llama.cpp does.
    """
    t = dict(model.tensors)
    for name, (a, b, scale) in (loras or {}).items():
        t[name] = t[name] + scale * (b @ a)
    neox = model.arch in NEOX_ROPE_ARCHS
    H, KV, D = model.n_head, model.n_head_kv, model.head_dim
    x = t["token_embd.weight"][torch.tensor(tokens)]  # (T, C)
    T = x.shape[0]
    mask = torch.full((T, T), float("-inf")).triu(1)
    for i in range(model.n_layer):
        p = f"blk.{i}"
        h = _rms_norm(x, t[f"{p}.attn_norm.weight"], model.rms_eps)
        q = _linear(t, f"{p}.attn_q", h).view(T, H, D)
        k = _linear(t, f"{p}.attn_k", h).view(T, KV, D)
        v = _linear(t, f"{p}.attn_v", h).view(T, KV, D)
        q, k = _rope(q, model, neox), _rope(k, model, neox)
        k, v = k.repeat_interleave(H // KV, dim=1), v.repeat_interleave(H // KV, dim=1)  # (T, H, D)
        scores = torch.einsum("qhd,khd->hqk", q, k) / D**0.5 + mask  # (H, T, T)
        attn = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(T, H * D)
        x = x + _linear(t, f"{p}.attn_output", attn)
        h = _rms_norm(x, t[f"{p}.ffn_norm.weight"], model.rms_eps)
        gate, up = _linear(t, f"{p}.ffn_gate", h), _linear(t, f"{p}.ffn_up", h)
        x = x + _linear(t, f"{p}.ffn_down", torch.nn.functional.silu(gate) * up)
    x = _rms_norm(x, t["output_norm.weight"], model.rms_eps)
    output = t.get("output.weight", t["token_embd.weight"])  # tied embeddings: llama.cpp reuses token_embd
    return x @ output.T


def read_gguf_lora(path) -> tuple[dict[str, tuple], dict]:
    """A GGUF LoRA adapter as {base tensor name: (A (r, in), B (out, r), alpha / r)} and its fields."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    alpha = float(field(reader, "adapter.lora.alpha"))
    tensors = {t.name: dequantized(t) for t in reader.tensors}
    loras = {}
    for name, a in tensors.items():
        if name.endswith(".lora_a"):
            base = name[: -len(".lora_a")]
            b = tensors[f"{base}.lora_b"]
            loras[base] = (a, b, alpha / a.shape[0])
    return loras, dict(reader.fields)
