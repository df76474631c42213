"""Session fixtures of the data tests (the helpers behind them are in data_helpers.py)."""

from __future__ import annotations

import pytest
from data_helpers import make_bpe_tokenizer, make_word_tokenizer
from transformers import PreTrainedTokenizerFast


@pytest.fixture(scope="session")
def word_tokenizer() -> PreTrainedTokenizerFast:
    return make_word_tokenizer()


@pytest.fixture(scope="session")
def bpe_tokenizer() -> PreTrainedTokenizerFast:
    return make_bpe_tokenizer(
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
