"""Tiny tokenizers built on the fly, and a writer of dataset files, for the data tests."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

SPECIALS = ["<unk>", "<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
WORDS = (
    "hello world what is two plus four the answer user assistant system you are helpful "
    "say hi there bye thanks a b c d e f g h"
).split()
VOCAB = {token: index for index, token in enumerate(SPECIALS + WORDS)}

# ChatML, with spaces around the pieces so that a whitespace tokenizer splits them into words
CHATML = (
    "{% for m in messages %}<|im_start|> {{ m.role }} {{ m.content }} <|im_end|> {% endfor %}"
    "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}"
)


def word_ids(text: str) -> list[int]:
    """Ids of a text in the word-level tokenizer, written out by hand."""
    return [VOCAB[word] for word in text.split()]


def _wrap(backend: Tokenizer, chat_template: str | None) -> PreTrainedTokenizerFast:
    """`backend` as a transformers tokenizer with the <s>/</s>/<pad>/<unk> and ChatML special tokens."""
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer


def make_word_tokenizer(chat_template: str | None = CHATML, bos: bool = True) -> PreTrainedTokenizerFast:
    """One token per whitespace-separated word; BOS added in front when ``bos``; offsets exact."""
    backend = Tokenizer(models.WordLevel(VOCAB, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    if bos:
        backend.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", VOCAB["<s>"])]
        )
    return _wrap(backend, chat_template)


SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Question: what is two plus two? Answer: four.",
    "Below is an instruction that describes a task. Write a response.",
    "Hello there, how are you today? I am fine, thanks for asking!",
    "Packing puts several short samples into one long sequence.",
] * 4


def make_bpe_tokenizer(chat_template: str | None = None) -> PreTrainedTokenizerFast:
    """A small byte-level BPE (merges cross word boundaries' spaces, like GPT-2) with BOS added."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator(SENTENCES, trainer)
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", backend.token_to_id("<s>"))]
    )
    return _wrap(backend, chat_template)


def write_rows(path: Path, rows: list[dict]) -> Path:
    """Write ``rows`` to ``path`` in the file type its suffix names."""
    suffix = path.suffix
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    elif suffix == ".json":
        path.write_text(json.dumps(rows), encoding="utf-8")
    elif suffix == ".csv":
        with open(path, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            for row in rows:
                writer.writerow({key: json.dumps(v) if isinstance(v, list) else v for key, v in row.items()})
    elif suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        raise ValueError(suffix)
    return path
