"""The bytes a QLoRA training step holds, from the model's config.json and the training config alone.

Each function returns one named component of `memory_plan.estimate_memory`, from the shapes of a
Llama-class decoder (attention q/k/v/o and a gated MLP, as Llama, Mistral, Qwen, SmolLM and Gemma
have): H hidden, I intermediate, L layers, nh/nkv query/key-value heads of hd, V vocabulary, and
per step N = micro_batch_size x seq_len tokens, b bytes per compute-dtype element.

Activations saved for backward per token and decoder layer, in the order the layer runs
(`modules/lora_function.py` saves the dropped-out input xd of each LoRA linear and its [T, r]
projection; with dropout 0, xd is the input itself and the linears reading one tensor share it):

    each RMSNorm:   4H (its float32 copy of the input; the weight is frozen, so its product saves nothing)
    q, k, v:        xd of the norm output (3 bH with dropout, else bH)
    attention:      rotated q and k, v and the output (b (2 nh hd + 2 nkv hd)), float32 log-sum-exp (4 nh)
    o_proj:         xd of the attention output (b nh hd with dropout, else the output attention saved)
    gate, up:       xd of the norm output (2 bH with dropout, else bH)
    MLP:            gate and up outputs, the activation's output (3 bI); down_proj's xd (bI)
    LoRA:           the [T, r] projection of each adapted linear (b r)

With gradient checkpointing only each layer's input is kept (bH per token and layer), and one
layer's activations are rebuilt during its backward. Backward needs a working set for the layer it
is in (the gradients of its activations), counted as `BACKWARD_LAYERS` layers of activations.
"""

from __future__ import annotations

from dataclasses import dataclass

CHUNK_ELEMENTS = 1 << 24
"""Logits per chunk of the fused loss (`modules.linear_cross_entropy.CHUNK_ELEMENTS`)."""

BACKWARD_LAYERS = 1.0
"""Layers of activations the backward pass of one decoder layer adds while it runs (its gradients)."""

PLAIN_LOSS_BYTES_PER_LOGIT = 12
"""Peak bytes per [token, vocab] logit of the unfused loss: the float32 log-softmax it saves, the
float32 gradient arriving in backward and the float32 gradient it returns (12 = 3 x 4)."""

BLOCKSIZE_8BIT = 256
MIN_8BIT_NUMEL = 4096
"""8-bit AdamW: one float32 absmax per 256 values; tensors under 4096 values keep float32 moments."""

PAGED_BUFFER_BYTES = 64 * 2**20
"""Paged AdamW's resident buffer (both moments of one piece), `training.optim.PagedAdamW`."""

LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_FOUR_NORM_TYPES = ("gemma2", "gemma3", "gemma3_text")
_QK_NORM_TYPES = ("gemma3", "gemma3_text", "qwen3", "olmo2")


@dataclass(frozen=True)
class Architecture:
    """The shapes of a decoder-only transformer that decide its memory."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied_embeddings: bool
    model_type: str = "llama"
    softcap: bool = False

    @classmethod
    def of(cls, model_config) -> Architecture:
        """The architecture of a transformers config (its text config for a multimodal one)."""
        text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
        hidden, heads = int(text.hidden_size), int(text.num_attention_heads)
        head_dim = getattr(text, "head_dim", None) or hidden // heads
        return cls(hidden=hidden, intermediate=int(text.intermediate_size), layers=int(text.num_hidden_layers),
                   heads=heads, kv_heads=int(getattr(text, "num_key_value_heads", None) or heads),
                   head_dim=int(head_dim), vocab=int(text.vocab_size),
                   tied_embeddings=bool(getattr(model_config, "tie_word_embeddings", False)),
                   model_type=str(getattr(text, "model_type", "llama")),
                   softcap=bool(getattr(text, "final_logit_softcapping", None)))

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(out, in) of each linear of one decoder layer, by name."""
        q, kv, h, i = self.heads * self.head_dim, self.kv_heads * self.head_dim, self.hidden, self.intermediate
        return {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q),
                "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}

    def norms_per_layer(self) -> int:
        """RMSNorms per decoder layer (Gemma 2/3 norm before and after each block)."""
        return 4 if self.model_type in _FOUR_NORM_TYPES else 2

    def norm_params(self) -> int:
        """Parameters of every norm: per layer, the q/k norms where the model has them, and the final one."""
        qk = 2 * self.head_dim if self.model_type in _QK_NORM_TYPES else 0
        return self.layers * (self.norms_per_layer() * self.hidden + qk) + self.hidden


def adapted(targets) -> list[str]:
    """The linear names of one layer that get adapters: all seven for "all-linear", else the named ones."""
    if targets == "all-linear":
        return list(LINEAR_NAMES)
    return [name for name in LINEAR_NAMES if any(name.endswith(target) for target in targets)]


def four_bit_bytes(numel: int, blocksize: int, double_quant: bool) -> int:
    """Storage of `numel` weights in bitsandbytes' 4-bit layout: packed codes (0.5 byte each) and the absmax
    per block: float32, or with double quantization one 8-bit code per block plus one float32 per 256 blocks."""
    blocks = -(-numel // blocksize)
    absmax = blocks + 4 * -(-blocks // 256) if double_quant else 4 * blocks
    return -(-numel // 2) + absmax


def layer_four_bit_bytes(arch: Architecture, blocksize: int, double_quant: bool) -> int:
    """4-bit storage of one decoder layer's linears."""
    return sum(four_bit_bytes(o * i, blocksize, double_quant) for o, i in arch.linear_shapes().values())


def sixteen_bit_bytes(arch: Architecture, dtype_bytes: int) -> int:
    """Embeddings, an untied output head and the norms, kept in the compute dtype."""
    heads = 1 if arch.tied_embeddings else 2
    return (heads * arch.vocab * arch.hidden + arch.norm_params()) * dtype_bytes


def scratch_bytes(arch: Architecture, dtype_bytes: int) -> int:
    """The dequantization buffers, one per distinct weight shape, reused by every layer (`quant/scratch.py`)."""
    return sum(o * i for o, i in set(arch.linear_shapes().values())) * dtype_bytes


def adapter_sizes(arch: Architecture, names: list[str], rank: int) -> list[int]:
    """Values of each trainable LoRA tensor: A [r, in] and B [out, r] per adapted linear and layer."""
    shapes = arch.linear_shapes()
    return [rank * n for name in names for n in shapes[name]] * arch.layers


def full_sizes(arch: Architecture) -> list[int]:
    """Values of each parameter of the whole model (method full trains them all)."""
    linears = [o * i for o, i in arch.linear_shapes().values()] * arch.layers
    return linears + [arch.vocab * arch.hidden] * (1 if arch.tied_embeddings else 2) + [arch.norm_params()]


def optimizer_bytes(sizes: list[int], optimizer: str) -> int:
    """Optimizer state of tensors of `sizes` values: adamw two float32 moments; adamw8bit two 8-bit moments and
    their absmax (float32 below 4096 values); paged_adamw only its resident buffer (the moments live in a file)."""
    if optimizer == "adamw8bit":
        return sum(2 * (n + 4 * -(-n // BLOCKSIZE_8BIT)) if n >= MIN_8BIT_NUMEL else 8 * n for n in sizes)
    if optimizer == "paged_adamw":
        return min(PAGED_BUFFER_BYTES, 8 * max(sizes, default=0))
    return 8 * sum(sizes)


def load_bytes(arch: Architecture, dtype_bytes: int) -> int:
    """The loader's transient (`loading/load.py`): the largest checkpoint tensor read in float32 (a GGUF tensor
    is dequantized to float32) and its copy in the compute dtype."""
    largest = max(arch.vocab * arch.hidden, *(o * i for o, i in arch.linear_shapes().values()))
    return largest * (4 + dtype_bytes)


def layer_activation_bytes(arch: Architecture, tokens: int, dtype_bytes: int, names: list[str], rank: int,
                           dropout: bool) -> int:
    """Bytes one decoder layer saves for backward over `tokens` tokens (module docstring)."""
    b, h = dtype_bytes, arch.hidden
    q, kv = arch.heads * arch.head_dim, arch.kv_heads * arch.head_dim
    norms = arch.norms_per_layer() * 4 * h
    attention_inputs = (3 if dropout else 1) * b * h
    attention = b * (2 * q + 2 * kv) + 4 * arch.heads + (b * q if dropout else 0)  # o_proj's xd
    mlp_inputs = (2 if dropout else 1) * b * h
    mlp = 4 * b * arch.intermediate
    qk_norms = 4 * (q + kv) if arch.model_type in _QK_NORM_TYPES else 0
    lora = b * rank * len(names)
    per_token = norms + attention_inputs + attention + mlp_inputs + mlp + qk_norms + lora
    return tokens * per_token


def activation_bytes(arch: Architecture, tokens: int, dtype_bytes: int, names: list[str], rank: int,
                     dropout: bool, checkpointing: bool) -> int:
    """Saved activations of the whole decoder at the start of backward, plus the working set of backward."""
    layer = layer_activation_bytes(arch, tokens, dtype_bytes, names, rank, dropout)
    outside = tokens * (dtype_bytes * arch.hidden + 4 * arch.hidden + dtype_bytes * arch.hidden)  # embed, final norm
    if checkpointing:
        kept = arch.layers * tokens * dtype_bytes * arch.hidden + layer  # layer inputs + the rebuilt layer
    else:
        kept = arch.layers * layer
    return outside + kept + int(BACKWARD_LAYERS * layer)


def loss_bytes(arch: Architecture, tokens: int, dtype_bytes: int, fused: bool) -> int:
    """The output head and loss: fused, the gradient of the hidden states and one chunk of float32 logits (with
    its cast to the compute dtype, and a second float32 copy under a softcap); plain, [tokens, vocab] logits."""
    if not fused:
        return tokens * arch.vocab * (dtype_bytes + PLAIN_LOSS_BYTES_PER_LOGIT)
    chunk = min(tokens, max(1, CHUNK_ELEMENTS // arch.vocab)) * arch.vocab
    logits = chunk * (4 * (2 if arch.softcap else 1) + (dtype_bytes if dtype_bytes < 4 else 0))
    return 2 * tokens * dtype_bytes * arch.hidden + logits


def loss_check_bytes(arch: Architecture, seq_len: int, dtype_bytes: int, fused: bool) -> int:
    """The check of the fused loss against the plain one before the first step (no grad, one sequence):
    the logits in the compute dtype, their float32 copy and the float32 log-softmax."""
    return seq_len * arch.vocab * (dtype_bytes + 8) if fused else 0
