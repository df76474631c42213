"""Small models built from scratch, offline: a byte-level BPE tokenizer and a Llama-style model.

Used by `nibbletune quickstart` (which pretrains one for real) and by the tests (random ones).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")


def train_tokenizer(texts: Iterable[str], vocab_size: int = 512, split_regex: str | None = None):
    """A byte-level BPE tokenizer (transformers' fast wrapper) trained on `texts`.

    Special tokens: <pad> (id 0), <s> (1), </s> (2). Nothing is added around a text: the data
    stage appends EOS itself. `split_regex` replaces GPT-2's pre-tokenizer split.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    if split_regex is None:
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split_regex), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", model_max_length=1 << 30)


def llama_config(vocab_size: int, hidden_size: int = 64, num_layers: int = 2, heads: int = 4,
                 intermediate_size: int | None = None, max_positions: int = 512):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=heads, num_key_value_heads=heads,
        intermediate_size=intermediate_size or int(hidden_size * 8 / 3 + 63) // 64 * 64,
        max_position_embeddings=max_positions, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        tie_word_embeddings=False,
    )


def random_llama(config, seed: int = 0):
    """A seeded, randomly initialised LlamaForCausalLM in float32."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(config).float().eval()


def save_model_dir(model, tokenizer, directory: str | Path) -> Path:
    """Save model (safetensors) and tokenizer as a transformers directory."""
    directory = Path(directory)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory
