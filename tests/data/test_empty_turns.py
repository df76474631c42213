"""Empty assistant turns are never trained, conversations with nothing to train are dropped, both counted."""

from __future__ import annotations

import pytest
from data_helpers import VOCAB, make_word_tokenizer, word_ids, write_rows

from nibbletune.data import build_dataset, render_report

M = -100
END = VOCAB["<|im_end|>"]


def build(tmp_path, rows, tokenizer, **kwargs):
    return build_dataset(write_rows(tmp_path / "data.jsonl", rows), tokenizer, **{"seq_len": 64, **kwargs})


def chat_row(*turns):
    """A chat row from (role, content) pairs."""
    return {"messages": [{"role": role, "content": content} for role, content in turns]}


def sharegpt_row(*turns):
    """The same turns as a ShareGPT row."""
    speaker = {"user": "human", "assistant": "gpt", "system": "system"}
    return {"conversations": [{"from": speaker[role], "value": content} for role, content in turns]}


@pytest.mark.parametrize("make_row", [chat_row, sharegpt_row])
@pytest.mark.parametrize("empty", ["", "   ", "\n\t"])
def test_an_empty_assistant_turn_stays_in_context_untrained(tmp_path, word_tokenizer, make_row, empty):
    row = make_row(("user", "say hi"), ("assistant", empty), ("user", "hello"), ("assistant", "hi"))
    dataset = build(tmp_path, [row], word_tokenizer)
    [example] = dataset.examples
    # the turn order is kept: the empty turn is rendered between the two user turns ...
    assert example.input_ids == word_ids(
        "<|im_start|> user say hi <|im_end|> <|im_start|> assistant <|im_end|> "
        "<|im_start|> user hello <|im_end|> <|im_start|> assistant hi <|im_end|>"
    )
    # ... but only the non-empty assistant turn is trained (not the empty turn's <|im_end|>)
    assert example.labels == [M] * 14 + [VOCAB["hi"], END]
    assert dataset.stats.empty_assistant_turns == 1
    assert (dataset.stats.rows, dataset.stats.kept, dataset.stats.dropped) == (1, 1, 0)
    assert any("1 assistant turns are empty (or only whitespace) and are not trained" in w for w in dataset.warnings)
    assert "empty assistant turns: 1 (not trained)" in render_report(dataset, word_tokenizer, color=False)


@pytest.mark.parametrize("make_row", [chat_row, sharegpt_row])
def test_conversations_without_a_turn_to_train_are_dropped_and_counted_by_reason(tmp_path, word_tokenizer,
                                                                                 make_row):
    rows = [
        make_row(),                                                          # no turns at all
        make_row(("system", "you are helpful"), ("user", "hello")),          # no assistant turn
        make_row(("user", "hello"), ("assistant", " "), ("user", "thanks"), ("assistant", "")),  # all empty
        make_row(("user", "say hi"), ("assistant", "hi")),
    ]  # fmt: skip
    dataset = build(tmp_path, rows, word_tokenizer)
    stats = dataset.stats
    assert [example.source.rsplit(":", 1)[1] for example in dataset.examples] == ["4"]
    assert (stats.dropped_empty_conversation, stats.dropped_no_assistant, stats.dropped_empty_assistant) == (1, 1, 1)
    assert (stats.rows, stats.kept, stats.dropped, stats.dropped_conversations) == (4, 1, 3, 3)
    assert stats.empty_assistant_turns == 2
    assert stats.dropped_no_trained == 0  # found before rendering, not as rows that happened to train nothing
    expected = ("3 of 4 conversations have no assistant turn to train and were dropped: 1 empty (no turns), "
                "1 without an assistant turn, 1 whose assistant turns are all empty")
    assert expected in dataset.warnings
    report = render_report(dataset, word_tokenizer, color=False)
    assert ("rows: 4   kept: 1   truncated: 0   dropped: 3 (1 empty (no turns), 1 without an assistant turn, "
            "1 whose assistant turns are all empty)") in report


def test_only_conversations_without_turns_to_train_mask_everything(tmp_path, word_tokenizer):
    rows = [chat_row(("user", "hello"), ("assistant", "")), chat_row()]
    dataset = build(tmp_path, rows, word_tokenizer)
    assert dataset.examples == []
    expected = ("every token is masked: none of the 2 rows has a trained token left (1 empty (no turns); "
                "1 whose assistant turns are all empty); nothing would be learned")
    assert expected in dataset.warnings


def test_a_tool_call_without_text_is_not_an_empty_turn(tmp_path):
    template = (
        "{% for m in messages %}<|im_start|> {{ m.role }} "
        "{% if m.tool_calls %}{{ m.tool_calls[0].function.name }}{% else %}{{ m.content }}{% endif %} <|im_end|> "
        "{% endfor %}{% if add_generation_prompt %}<|im_start|> assistant {% endif %}"
    )
    call = {"type": "function", "function": {"name": "hello", "arguments": {}}}
    row = {"messages": [{"role": "user", "content": "say hi"},
                        {"role": "assistant", "content": None, "tool_calls": [call]}]}  # fmt: skip
    dataset = build(tmp_path, [row], make_word_tokenizer(template))
    assert dataset.stats.empty_assistant_turns == 0
    assert [label for label in dataset.examples[0].labels if label != M] == [VOCAB["hello"], END]


def test_generation_markers_leave_an_empty_turn_untrained(tmp_path):
    # earlier assistant turns are rewritten, so the turns are located through {% generation %} markers
    rewriting = (
        "{% for m in messages %}<|im_start|> {{ m.role }} "
        "{% if m.role == 'assistant' %}{% generation %}"
        "{% if loop.last %}{{ m.content }}{% else %}a{% endif %} <|im_end|>{% endgeneration %}"
        "{% else %}{{ m.content }} <|im_end|>{% endif %} {% endfor %}"
    )
    row = chat_row(("user", "say hi"), ("assistant", "hi"), ("user", "thanks"), ("assistant", " "))
    [example] = build(tmp_path, [row], make_word_tokenizer(rewriting)).examples
    assert example.input_ids[-3:] == [VOCAB["<|im_start|>"], VOCAB["assistant"], END]
    assert example.labels == [M] * 7 + [VOCAB["a"], END] + [M] * 7
