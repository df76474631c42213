"""Each format's ids and labels, checked token by token against ones written out by hand."""

from __future__ import annotations

import pytest
from data_helpers import VOCAB, make_bpe_tokenizer, make_word_tokenizer, word_ids, write_rows

from nibbletune.data import DataError, build_dataset
from nibbletune.data.formats import ALPACA_PROMPT, ALPACA_PROMPT_NO_INPUT

M = -100  # masked
BOS, EOS = VOCAB["<s>"], VOCAB["</s>"]
START, END = VOCAB["<|im_start|>"], VOCAB["<|im_end|>"]


def build(tmp_path, rows, tokenizer, **kwargs):
    return build_dataset(write_rows(tmp_path / "data.jsonl", rows), tokenizer, **{"seq_len": 64, **kwargs})


def test_text_trains_every_token_after_the_first_and_appends_eos(tmp_path, word_tokenizer):
    dataset = build(tmp_path, [{"text": "hello world"}], word_tokenizer)
    [example] = dataset.examples
    assert example.input_ids == [BOS, *word_ids("hello world"), EOS]
    assert example.labels == [M, *word_ids("hello world"), EOS]
    assert example.position_ids is None
    assert example.source.endswith("data.jsonl:1")
    assert dataset.stats.format == "text"


def test_text_without_bos_and_without_eos(tmp_path):
    tokenizer = make_word_tokenizer(bos=False)
    [example] = build(tmp_path, [{"text": "hello world"}], tokenizer, add_eos=False).examples
    assert example.input_ids == word_ids("hello world")
    assert example.labels == [M, VOCAB["world"]]  # nothing precedes the first token to predict it


def test_completion_trains_only_the_completion_and_eos(tmp_path, word_tokenizer):
    rows = [{"prompt": "what is two plus two", "completion": " four"}]
    [example] = build(tmp_path, rows, word_tokenizer).examples
    assert example.input_ids == [BOS, *word_ids("what is two plus two four"), EOS]
    assert example.labels == [M, M, M, M, M, M, VOCAB["four"], EOS]


@pytest.mark.parametrize("with_input", [True, False])
def test_alpaca_renders_the_standard_prompt_and_trains_the_output(tmp_path, with_input):
    tokenizer = make_bpe_tokenizer()
    row = {"instruction": "Say hi.", "input": "to the user" if with_input else "", "output": "Hello there!"}
    [example] = build(tmp_path, [row], tokenizer, seq_len=512).examples
    template = ALPACA_PROMPT if with_input else ALPACA_PROMPT_NO_INPUT
    prompt = template.format(instruction=row["instruction"], input=row["input"])
    assert "### Input:" in prompt if with_input else "### Input:" not in prompt
    full_ids = tokenizer(prompt + row["output"], add_special_tokens=False)["input_ids"]
    assert example.input_ids == [BOS, *full_ids, EOS]
    trained_text = tokenizer.decode([label for label in example.labels if label != M])
    assert trained_text == "Hello there!</s>"
    # masked tokens form the prompt exactly (the boundary "\n" + "Hello" does not merge in this vocab)
    masked = [token for token, label in zip(example.input_ids, example.labels) if label == M]
    assert tokenizer.decode(masked[1:]) == prompt


def test_alpaca_input_may_be_missing_or_null(tmp_path, word_tokenizer):
    rows = [
        {"instruction": "say hi", "output": "hi"},
        {"instruction": "say hi", "input": None, "output": "hi"},
    ]
    dataset = build(tmp_path, rows, make_bpe_tokenizer(), seq_len=512)
    assert dataset.examples[0].input_ids == dataset.examples[1].input_ids


def test_prompt_and_completion_are_tokenized_as_one_text(tmp_path):
    """The ids are those of prompt + completion as one string; a token across the boundary is trained."""
    tokenizer = make_bpe_tokenizer()
    row = {"prompt": "Question: what is two plus two? Answer: ", "completion": "four."}
    [example] = build(tmp_path, [row], tokenizer).examples
    whole = tokenizer(row["prompt"] + row["completion"])["input_ids"]
    separate = (
        tokenizer(row["prompt"])["input_ids"]
        + tokenizer(row["completion"], add_special_tokens=False)["input_ids"]
    )
    assert whole != separate  # "Ġfour" spans the boundary; separately it would be "Ġ" + "four"
    assert example.input_ids == whole + [tokenizer.eos_token_id]
    assert tokenizer.convert_ids_to_tokens([t for t in example.labels if t != M]) == ["Ġfour", ".", "</s>"]


def test_chat_trains_assistant_turns_with_their_end_of_turn_token(tmp_path, word_tokenizer):
    messages = [
        {"role": "system", "content": "you are helpful"},
        {"role": "user", "content": "say hi"},
        {"role": "assistant", "content": "hi there"},
        {"role": "user", "content": "thanks"},
        {"role": "assistant", "content": "bye"},
    ]
    [example] = build(tmp_path, [{"messages": messages}], word_tokenizer).examples
    system = [START, *word_ids("system you are helpful"), END]
    user1 = [START, *word_ids("user say hi"), END]
    reply1_prompt, reply1 = [START, VOCAB["assistant"]], [*word_ids("hi there"), END]
    user2 = [START, *word_ids("user thanks"), END]
    reply2_prompt, reply2 = [START, VOCAB["assistant"]], [VOCAB["bye"], END]
    assert example.input_ids == system + user1 + reply1_prompt + reply1 + user2 + reply2_prompt + reply2
    masked = lambda ids: [M] * len(ids)  # noqa: E731
    assert example.labels == (
        masked(system) + masked(user1) + masked(reply1_prompt) + reply1
        + masked(user2) + masked(reply2_prompt) + reply2
    )  # fmt: skip
    # the template ends turns with <|im_end|>: no extra EOS, and no warning about stopping
    assert EOS not in example.input_ids


def test_chat_with_bpe_template_includes_newline_after_end_of_turn(tmp_path, bpe_tokenizer):
    messages = [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": "Answer: four."}]
    [example] = build(tmp_path, [{"messages": messages}], bpe_tokenizer).examples
    full = bpe_tokenizer.apply_chat_template(messages, tokenize=False)
    assert example.input_ids == bpe_tokenizer(full, add_special_tokens=False)["input_ids"]
    trained = bpe_tokenizer.decode([t for t in example.labels if t != M])
    assert trained == "Answer: four.<|im_end|>\n"


def test_chat_template_without_end_of_turn_gets_eos(tmp_path):
    tokenizer = make_word_tokenizer("{% for m in messages %}{{ m.role }} {{ m.content }} {% endfor %}")
    messages = [{"role": "user", "content": "say hi"}, {"role": "assistant", "content": "hi"}]
    [example] = build(tmp_path, [{"messages": messages}], tokenizer).examples
    assert example.input_ids == [*word_ids("user say hi assistant hi"), EOS]
    # no generation prompt in this template: at inference the model writes "assistant" itself: trained
    assert example.labels == [M, M, M, VOCAB["assistant"], VOCAB["hi"], EOS]
    dataset = build(tmp_path, [{"messages": messages}], tokenizer, add_eos=False)
    assert dataset.examples[0].labels == [M, M, M, VOCAB["assistant"], VOCAB["hi"]]
    assert any("will not learn to stop" in warning for warning in dataset.warnings)


def test_chat_without_assistant_turn_is_dropped(tmp_path, word_tokenizer):
    rows = [
        {"messages": [{"role": "user", "content": "say hi"}]},
        {"messages": [{"role": "user", "content": "say hi"}, {"role": "assistant", "content": "hi"}]},
    ]
    dataset = build(tmp_path, rows, word_tokenizer)
    assert (dataset.stats.rows, dataset.stats.kept, dataset.stats.dropped) == (2, 1, 1)
    assert dataset.stats.dropped_no_assistant == 1
    assert any("1 without an assistant turn" in warning for warning in dataset.warnings)


def test_chat_needs_a_chat_template(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hi"}]}]
    with pytest.raises(DataError, match="chat template"):
        build(tmp_path, rows, make_word_tokenizer(chat_template=None))


# Closes the final assistant message with </s> instead of <|im_end|>: prefixes ending in an assistant
# turn disagree with the whole conversation after that turn's content.
_LAST_TURN_DIFFERS = (
    "{% for m in messages %}<|im_start|> {{ m.role }} {{ m.content }} "
    "{% if m.role == 'assistant' and loop.last %}</s> {% else %}<|im_end|> {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}"
)


def test_chat_turn_that_renders_differently_as_last_message_ends_where_renderings_agree(tmp_path):
    tokenizer = make_word_tokenizer(_LAST_TURN_DIFFERS)
    messages = [
        {"role": "user", "content": "say hi"},
        {"role": "assistant", "content": "hi"},
        {"role": "user", "content": "thanks"},
        {"role": "assistant", "content": "bye"},
    ]
    [example] = build(tmp_path, [{"messages": messages}], tokenizer).examples
    # turn 1 is closed by <|im_end|> in the whole conversation but by </s> when rendered last:
    # its trained part is the text both renderings share
    user1, reply1 = [START, *word_ids("user say hi"), END], [START, VOCAB["assistant"], VOCAB["hi"], END]
    user2, reply2 = [START, *word_ids("user thanks"), END], [START, VOCAB["assistant"], VOCAB["bye"], EOS]
    assert example.input_ids == user1 + reply1 + user2 + reply2
    assert example.labels == [M] * 5 + [M, M, VOCAB["hi"], M] + [M] * 4 + [M, M, VOCAB["bye"], EOS]


def test_chat_falls_back_to_generation_markers(tmp_path):
    # earlier assistant turns lose their content in the whole conversation: prefixes cannot locate them
    rewriting = (
        "{% for m in messages %}<|im_start|> {{ m.role }} "
        "{% if m.role == 'assistant' %}{% generation %}"
        "{% if loop.last %}{{ m.content }}{% else %}a{% endif %} <|im_end|>{% endgeneration %}"
        "{% else %}{{ m.content }} <|im_end|>{% endif %} {% endfor %}"
    )
    messages = [
        {"role": "user", "content": "say hi"},
        {"role": "assistant", "content": "hi"},
        {"role": "user", "content": "thanks"},
        {"role": "assistant", "content": "bye"},
    ]
    tokenizer = make_word_tokenizer(rewriting)
    [example] = build(tmp_path, [{"messages": messages}], tokenizer).examples
    assert example.input_ids == [
        START, *word_ids("user say hi"), END, START, VOCAB["assistant"], VOCAB["a"], END,
        START, *word_ids("user thanks"), END, START, VOCAB["assistant"], VOCAB["bye"], END,
    ]  # fmt: skip
    assert example.labels == [M] * 7 + [VOCAB["a"], END] + [M] * 6 + [VOCAB["bye"], END]

    no_markers = rewriting.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    with pytest.raises(DataError, match=r"data.jsonl:1: .*generation"):
        build(tmp_path, [{"messages": messages}], make_word_tokenizer(no_markers))


def test_truncation_and_dropped_counts(tmp_path, word_tokenizer):
    rows = [
        {"text": "a b c d e f g h"},  # 1 + 8 + 1 = 10 tokens: truncated, kept
        {"text": "a b"},  # 4 tokens: fits
        {"prompt": "a b c d e f g", "completion": " h"},  # completion past seq_len: dropped
    ]
    write_rows(tmp_path / "text.jsonl", rows[:2])
    write_rows(tmp_path / "completion.jsonl", rows[2:])
    text = build_dataset(tmp_path / "text.jsonl", word_tokenizer, seq_len=6)
    assert [len(example.input_ids) for example in text.examples] == [6, 4]
    assert text.examples[0].input_ids == [BOS, *word_ids("a b c d e")]
    assert (text.stats.truncated, text.stats.dropped, text.stats.kept) == (1, 0, 2)
    assert text.stats.lengths == [10, 4]
    completion = build_dataset(tmp_path / "completion.jsonl", word_tokenizer, seq_len=6)
    assert (completion.stats.truncated, completion.stats.dropped_truncated, completion.stats.kept) == (
        1,
        1,
        0,
    )
    assert completion.examples == []


def test_limit_takes_the_first_rows(tmp_path, word_tokenizer):
    rows = [{"text": "a b"}, {"text": "c d"}, {"text": "e f"}]
    dataset = build(tmp_path, rows, word_tokenizer, limit=2)
    assert dataset.stats.rows == 2
    assert [example.input_ids[1] for example in dataset.examples] == [VOCAB["a"], VOCAB["c"]]


def test_stats_describe_lengths_and_trained_fraction(tmp_path, word_tokenizer):
    rows = [{"prompt": "a b c", "completion": " d"}] * 3 + [{"prompt": "a", "completion": " b c d e f g h"}]
    stats = build(tmp_path, rows, word_tokenizer).stats
    assert stats.lengths == [6, 6, 6, 10]
    lengths = stats.row_lengths
    assert (lengths.min, lengths.p50, lengths.p95, lengths.max) == (6, 6, 10, 10)
    assert lengths.mean == pytest.approx(7.0)
    assert stats.trained_tokens == 3 * 2 + 8 and stats.total_tokens == 28
    assert stats.trained_token_fraction == pytest.approx(14 / 28)


def test_tokenizers_without_offsets_tokenize_segment_by_segment(tmp_path, monkeypatch):
    tokenizer = make_word_tokenizer()
    rows = [{"prompt": "what is two plus two", "completion": " four"}]
    with_offsets = build(tmp_path, rows, tokenizer).examples
    monkeypatch.setattr(type(tokenizer), "is_fast", property(lambda self: False))
    assert build(tmp_path, rows, tokenizer).examples == with_offsets


def test_add_eos_needs_an_eos_token(tmp_path):
    tokenizer = make_word_tokenizer()
    tokenizer.eos_token = None
    with pytest.raises(DataError, match="no eos_token"):
        build(tmp_path, [{"text": "hello world"}], tokenizer)
    [example] = build(tmp_path, [{"text": "hello world"}], tokenizer, add_eos=False).examples
    assert example.input_ids == [BOS, *word_ids("hello world")]
