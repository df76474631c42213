"""ShareGPT rows: detected from `conversations`, roles mapped, rendered exactly as the same chat rows."""

from __future__ import annotations

import re

import pytest
from data_helpers import write_rows

from nibbletune.data import DataError, build_dataset, detect_format, load_records
from nibbletune.data.conversations import SHAREGPT_ROLES

SHAREGPT = [
    {"id": "a_0", "conversations": [{"from": "human", "value": "say hi"}, {"from": "gpt", "value": "hi there"}]},
    {"id": "b_0", "conversations": [{"from": "system", "value": "you are helpful"},
                                    {"from": "human", "value": "hello"}, {"from": "gpt", "value": "hi"},
                                    {"from": "human", "value": "thanks"}, {"from": "gpt", "value": "bye"}]},
]  # fmt: skip
CHAT = [
    {"messages": [{"role": "user", "content": "say hi"}, {"role": "assistant", "content": "hi there"}]},
    {"messages": [{"role": "system", "content": "you are helpful"}, {"role": "user", "content": "hello"},
                  {"role": "assistant", "content": "hi"}, {"role": "user", "content": "thanks"},
                  {"role": "assistant", "content": "bye"}]},
]  # fmt: skip


def test_conversations_column_is_detected_as_sharegpt():
    assert detect_format(["conversations", "id"]) == "sharegpt"
    assert detect_format(["messages", "conversations"]) == "chat"  # messages is the more specific column
    with pytest.raises(DataError, match="'messages' or 'conversations'"):
        detect_format(["turns"])


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_sharegpt_gives_the_samples_of_the_same_chat_rows(tmp_path, word_tokenizer, suffix):
    sharegpt = build_dataset(write_rows(tmp_path / f"sharegpt{suffix}", SHAREGPT), word_tokenizer, seq_len=128)
    chat = build_dataset(write_rows(tmp_path / "chat.jsonl", CHAT), word_tokenizer, seq_len=128)
    assert sharegpt.stats.format == "sharegpt"
    assert [(e.input_ids, e.labels) for e in sharegpt.examples] == [(e.input_ids, e.labels) for e in chat.examples]
    explicit = build_dataset(tmp_path / f"sharegpt{suffix}", word_tokenizer, seq_len=128, format="sharegpt")
    assert [e.labels for e in explicit.examples] == [e.labels for e in chat.examples]


def test_every_known_role_is_mapped_ignoring_case(tmp_path):
    turns = [{"from": name.upper() if index % 2 else name, "value": "hi"} for index, name in enumerate(SHAREGPT_ROLES)]
    [record] = load_records(write_rows(tmp_path / "data.jsonl", [{"conversations": turns}]))
    assert [message["role"] for message in record.fields["messages"]] == list(SHAREGPT_ROLES.values())
    assert {"human": "user", "gpt": "assistant", "chatgpt": "assistant", "bing": "assistant", "bard": "assistant",
            "system": "system"}.items() <= SHAREGPT_ROLES.items()


def test_role_and_content_spelling_is_read_too(tmp_path, word_tokenizer):
    rows = [{"conversations": [{"role": "user", "content": "say hi"}, {"role": "assistant", "content": "hi there"}]}]
    dataset = build_dataset(write_rows(tmp_path / "data.jsonl", rows), word_tokenizer, seq_len=128)
    chat = build_dataset(write_rows(tmp_path / "chat.jsonl", CHAT[:1]), word_tokenizer, seq_len=128)
    assert [e.labels for e in dataset.examples] == [e.labels for e in chat.examples]


@pytest.mark.parametrize("conversations, pattern", [
    ([{"from": "human", "value": "hi"}, {"from": "tool", "value": "42"}],
     r"conversations\[1\]: 'from' must be one of human, user, gpt, .*, got 'tool'"),
    ([{"from": "human"}], r"conversations\[0\]: 'value' must be a string, got nothing"),
    ([{"value": "hi"}], r"conversations\[0\]: 'from' must be one of .*, got nothing"),
    (["hi"], r"conversations\[0\] must be a \{from, value\} object, got str"),
    ({"from": "human"}, r"column 'conversations' must be a list of \{from, value\} objects, got dict"),
])  # fmt: skip
def test_bad_sharegpt_rows_name_file_line_and_turn(tmp_path, conversations, pattern):
    path = write_rows(tmp_path / "data.jsonl", [{"conversations": conversations}])
    with pytest.raises(DataError, match=re.escape(f"{path}:1: ") + pattern):
        load_records(path)


def test_sharegpt_needs_a_chat_template(tmp_path):
    from data_helpers import make_word_tokenizer

    with pytest.raises(DataError, match="format 'sharegpt' needs the tokenizer's chat template"):
        build_dataset(write_rows(tmp_path / "data.jsonl", SHAREGPT), make_word_tokenizer(None), seq_len=64)
