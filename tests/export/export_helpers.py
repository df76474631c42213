"""Shared by tests/export: a tiny random Llama with a BPE tokenizer trained on the fly, and adapters for it."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

from nibbletune.quant import QuantSettings

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "def add(a, b): return a + b",
    "question: what is the capital of france? answer: paris",
    "in 1887 the committee met twice, once in spring and once in autumn",
] * 20


def train_tokenizer(vocab_size: int = 320, chat_template: bool = True):
    """A byte-level BPE tokenizer (GPT-2 style) trained on a small corpus, as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<s>", "</s>", "<|user|>", "<|assistant|>", "<|end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_llama(seed: int = 0, hidden: int = 64, vocab_size: int = 320, dtype=torch.float32, **overrides):
    """A random 2-layer Llama, hidden 64, with perturbed norms (so a loader that skips them is caught)."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=128, tie_word_embeddings=False,
        bos_token_id=0, eos_token_id=1, **overrides,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.1 * torch.randn_like(param))
            else:
                param.mul_(3.0)  # wider logit spread than the 0.02 init, so top-1 is meaningful
    return model.to(dtype)


def save_model(model, path: Path, tokenizer=None, **kwargs) -> Path:
    """save_pretrained (safetensors) plus the tokenizer."""
    model.save_pretrained(path, safe_serialization=True, **kwargs)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path


def make_adapter(base: Path, out: Path, use_dora: bool = False, seed: int = 1, r: int = 8, targets="all-linear",
                 dropout: float = 0.0, **quant) -> Path:
    """Load `base` in 4 bits (`quant`: QuantSettings fields quant_type, blocksize, double_quant, skip_modules),
    attach LoRA with random nonzero B (a 'trained' adapter), save it."""
    from nibbletune.loading import load_model, save_adapter
    from nibbletune.modules import LoraSettings, apply_lora, lora_layers

    model = load_model(base, QuantSettings(compute_dtype="float32", **quant))
    settings = LoraSettings(r=r, alpha=16, dropout=dropout, target_modules=targets, use_dora=use_dora)
    apply_lora(model, settings)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.copy_(0.2 * torch.randn(layer.lora_B.weight.shape, generator=generator))
            if use_dora:
                m = layer.lora_magnitude_vector
                m.mul_(1 + 0.1 * torch.randn(m.shape, generator=generator))
    save_adapter(model, out, settings)
    return out


TEXT = "question: what is the capital of france? answer:  paris, in 1887.  it's 12345 -- ok!!"
SMALL = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "max_position_embeddings": 128, "bos_token_id": 0, "eos_token_id": 1}


def tiny_family(family: str, vocab_size: int):
    """A random 2-layer model of `family`, weights widened and norms perturbed as tiny_llama does."""
    if family == "llama":
        return tiny_llama(vocab_size=vocab_size)
    if family in ("llama3-rope", "linear-rope"):
        rope = ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                 "original_max_position_embeddings": 16} if family == "llama3-rope" else
                {"rope_type": "linear", "factor": 4.0})
        config = transformers.LlamaConfig(**SMALL, vocab_size=vocab_size, rope_parameters={"rope_theta": 10000.0, **rope})
    elif family == "llama-tied":
        config = transformers.LlamaConfig(**SMALL, vocab_size=vocab_size, tie_word_embeddings=True)
    elif family == "llama-head-dim":  # head_dim * heads != hidden: exercises attention.key_length
        config = transformers.LlamaConfig(**SMALL, vocab_size=vocab_size, head_dim=32, rope_theta=500000.0)
    elif family == "mistral":
        config = transformers.MistralConfig(**SMALL, vocab_size=vocab_size, sliding_window=4096, rms_norm_eps=1e-5)
    else:
        config = transformers.Qwen2Config(**SMALL, vocab_size=vocab_size, tie_word_embeddings=family == "qwen2-tied",
                                          rope_theta=1000000.0)
    torch.manual_seed(2)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                param.add_(0.1 * torch.randn_like(param))
            else:
                param.mul_(3.0)
    return model


def save_family(family: str, root: Path, tokenizer, token_ids: list[int]):
    """(model dir under root/family, the HF model, its float32 logits for token_ids) of tiny_family(family)."""
    model = tiny_family(family, len(tokenizer))
    with torch.no_grad():
        logits = model(torch.tensor([token_ids])).logits[0]
    return save_model(model, root / family, tokenizer), model, logits
