"""A pure-torch forward for the GGUF architectures we export that reads ONLY a GGUF file, the way llama.cpp does.

It knows nothing about Hugging Face: hyperparameters come from the `<arch>.*` metadata keys,
weights from llama.cpp's tensor names (`token_embd`, `blk.N.attn_q`, ...), quantized tensors
are dequantized with `gguf.quants.dequantize`, and rotary embeddings follow llama.cpp's
per-architecture rope mode:

- "llama" (Llama, Mistral) uses LLAMA_ROPE_TYPE_NORM: rotate adjacent pairs (2i, 2i+1). HF
  rotates (i, i + d/2), so an exporter must have permuted q/k rows (convert_hf_to_gguf's
  `permute`) for this forward to match HF logits;
- "qwen2", "qwen3", "gemma3" and "phi3" use LLAMA_ROPE_TYPE_NEOX: rotate (i, i + d/2), the HF
  layout, no permutation.

Per architecture, as in llama.cpp's src/models/<arch>.cpp: qwen3 and gemma3 RMS-normalize each
q/k head (`attn_q_norm`, `attn_k_norm`) before rope; gemma3 scales the embeddings by
sqrt(n_embd), normalizes the attention and FFN outputs too (`post_attention_norm`,
`post_ffw_norm`), uses GELU (tanh), a sliding window on the layers of its pattern (every 6th
layer global unless `attention.sliding_window_pattern` lists them) with `rope.freq_base_swa`
there, and an optional final logit softcap; phi3 has fused `attn_qkv` (q, k, v rows) and
`ffn_up` (gate rows, then up rows) and runs without its sliding window.

A wrong tensor name, a missing/wrong hyperparameter or a wrong q/k layout shows up as logits that
disagree with the transformers model the file came from.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

NEOX_ROPE_ARCHS = {"qwen2", "qwen3", "gemma3", "phi3"}


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
    swa_layers: list[bool]  # layers llama.cpp runs with the sliding window (gemma3 only)
    sliding_window: int
    rope_base_swa: float
    final_softcap: float  # 0: none


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
    n_layer = int(req("block_count"))
    sliding_window = int(field(reader, f"{arch}.attention.sliding_window", 0)) if arch == "gemma3" else 0
    pattern = field(reader, f"{arch}.attention.sliding_window_pattern", 6)
    swa_layers = ([bool(x) for x in pattern] if isinstance(pattern, list) else
                  [sliding_window > 0 and il % pattern < pattern - 1 for il in range(n_layer)])
    return GGUFModel(
        arch=arch, n_layer=n_layer, n_embd=n_embd, n_ff=int(req("feed_forward_length")),
        n_head=n_head, n_head_kv=int(field(reader, f"{arch}.attention.head_count_kv", n_head)),
        head_dim=head_dim, n_rot=int(field(reader, f"{arch}.rope.dimension_count", head_dim)),
        rope_base=float(field(reader, f"{arch}.rope.freq_base", 10000.0)),
        rope_scale=1.0 / float(field(reader, f"{arch}.rope.scaling.factor", 1.0))
        if field(reader, f"{arch}.rope.scaling.type", "none") == "linear" else 1.0,
        rms_eps=float(req("attention.layer_norm_rms_epsilon")), n_ctx_train=int(req("context_length")),
        tensors={t.name: dequantized(t) for t in reader.tensors},
        fields={k: f for k, f in reader.fields.items()},
        swa_layers=swa_layers, sliding_window=sliding_window,
        rope_base_swa=float(field(reader, f"{arch}.rope.freq_base_swa", 10000.0)),
        final_softcap=float(field(reader, f"{arch}.final_logit_softcapping", 0.0)),
    )


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _rope(x: torch.Tensor, model: GGUFModel, neox: bool, base: float, scale: float) -> torch.Tensor:
    """x: (T, H, D). Rotate the first n_rot dims by position, llama.cpp NORM or NEOX pairing.

    llama.cpp's angle for pair i at position p: p * freq_scale * base^(-2i/n_rot) / rope_freqs[i].
    """
    T, n_rot = x.shape[0], model.n_rot
    inv_freq = base ** (-torch.arange(0, n_rot, 2, dtype=torch.float64) / n_rot)  # (n_rot/2,)
    if "rope_freqs.weight" in model.tensors:
        inv_freq = inv_freq / model.tensors["rope_freqs.weight"].double()
    angle = scale * torch.arange(T, dtype=torch.float64)[:, None] * inv_freq[None, :]  # (T, n_rot/2)
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


def _qkv(t: dict, p: str, h: torch.Tensor, model: GGUFModel):
    """q (T, H, D), k and v (T, KV, D): separate projections, or phi3's fused attn_qkv split by rows."""
    H, KV, D = model.n_head, model.n_head_kv, model.head_dim
    T = h.shape[0]
    if f"{p}.attn_qkv.weight" in t:
        q, k, v = _linear(t, f"{p}.attn_qkv", h).split([H * D, KV * D, KV * D], dim=-1)
    else:
        q, k, v = (_linear(t, f"{p}.attn_{n}", h) for n in "qkv")
    q, k, v = q.view(T, H, D), k.view(T, KV, D), v.view(T, KV, D)
    if f"{p}.attn_q_norm.weight" in t:  # per-head RMS norm over D (qwen3, gemma3)
        q = _rms_norm(q, t[f"{p}.attn_q_norm.weight"], model.rms_eps)
        k = _rms_norm(k, t[f"{p}.attn_k_norm.weight"], model.rms_eps)
    return q, k, v


def _ffn(t: dict, p: str, h: torch.Tensor, arch: str) -> torch.Tensor:
    if f"{p}.ffn_gate.weight" not in t:  # phi3: ffn_up holds [gate; up]
        gate, up = _linear(t, f"{p}.ffn_up", h).chunk(2, dim=-1)
    else:
        gate, up = _linear(t, f"{p}.ffn_gate", h), _linear(t, f"{p}.ffn_up", h)
    act = torch.nn.functional.gelu(gate, approximate="tanh") if arch == "gemma3" else torch.nn.functional.silu(gate)
    return _linear(t, f"{p}.ffn_down", act * up)


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
    if model.arch == "gemma3":
        x = x * model.n_embd**0.5
    T = x.shape[0]
    pos = torch.arange(T)
    causal = torch.full((T, T), float("-inf")).triu(1)
    window = torch.where(pos[:, None] - pos[None, :] >= model.sliding_window, float("-inf"), 0.0) + causal
    # llama.cpp's gemma3 (not its 27B) scales q by 1/sqrt(head_dim); the others too
    q_scale = (model.n_embd / H) ** -0.5 if model.arch == "gemma3" and model.n_layer == 62 else D**-0.5
    for i in range(model.n_layer):
        p = f"blk.{i}"
        swa = model.swa_layers[i]
        h = _rms_norm(x, t[f"{p}.attn_norm.weight"], model.rms_eps)
        q, k, v = _qkv(t, p, h, model)
        base, scale = (model.rope_base_swa, 1.0) if swa else (model.rope_base, model.rope_scale)
        q, k = _rope(q, model, neox, base, scale), _rope(k, model, neox, base, scale)
        k, v = k.repeat_interleave(H // KV, dim=1), v.repeat_interleave(H // KV, dim=1)  # (T, H, D)
        scores = torch.einsum("qhd,khd->hqk", q, k) * q_scale + (window if swa else causal)  # (H, T, T)
        attn = _linear(t, f"{p}.attn_output", torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(T, H * D))
        if f"{p}.post_attention_norm.weight" in t:
            attn = _rms_norm(attn, t[f"{p}.post_attention_norm.weight"], model.rms_eps)
        x = x + attn
        ffn = _ffn(t, p, _rms_norm(x, t[f"{p}.ffn_norm.weight"], model.rms_eps), model.arch)
        if f"{p}.post_ffw_norm.weight" in t:
            ffn = _rms_norm(ffn, t[f"{p}.post_ffw_norm.weight"], model.rms_eps)
        x = x + ffn
    x = _rms_norm(x, t["output_norm.weight"], model.rms_eps)
    output = t.get("output.weight", t["token_embd.weight"])  # tied embeddings: llama.cpp reuses token_embd
    logits = x @ output.T
    if model.final_softcap:
        logits = model.final_softcap * torch.tanh(logits / model.final_softcap)
    return logits


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
