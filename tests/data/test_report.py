"""The `nibbletune data` report: highlighted trained tokens, statistics, warnings for classic mistakes."""

from __future__ import annotations

import pytest
from data_helpers import make_bpe_tokenizer, make_word_tokenizer, write_rows

from nibbletune.data import DataError, build_dataset, render_report

GREEN, RESET = "\x1b[1;32m", "\x1b[0m"
CHAT = [{"messages": [{"role": "user", "content": "say hi"}, {"role": "assistant", "content": "hi there"}]}]


def build(tmp_path, rows, tokenizer, **kwargs):
    return build_dataset(write_rows(tmp_path / "data.jsonl", rows), tokenizer, **{"seq_len": 64, **kwargs})


def test_report_brackets_trained_text_without_color(tmp_path, word_tokenizer):
    rows = [{"prompt": "what is two plus two", "completion": " four"}] * 4
    dataset = build(tmp_path, rows, word_tokenizer)
    report = render_report(dataset, word_tokenizer, num_samples=2, color=False)
    assert "<s> what is two plus two[[ four </s>]]" in report
    assert report.count("── sample") == 2
    assert "\x1b[" not in report
    assert "rows: 4   kept: 4   truncated: 0   dropped: 0" in report
    assert "tokens per row: min 8   mean 8.0   p50 8   p95 8   max 8" in report
    assert "trained tokens: 8 of 32 (25.0%)" in report


def test_report_colors_trained_text(tmp_path, word_tokenizer):
    dataset = build(tmp_path, CHAT, word_tokenizer)
    report = render_report(dataset, word_tokenizer, color=True)
    assert f"{GREEN} hi there <|im_end|>{RESET}" in report
    assert "[[" not in report
    assert "warnings: none" in report


def test_report_keeps_spaces_of_byte_level_tokens(tmp_path):
    tokenizer = make_bpe_tokenizer()
    dataset = build(
        tmp_path, [{"prompt": "Question: what is two plus two? Answer:", "completion": " four."}], tokenizer
    )
    report = render_report(dataset, tokenizer, color=False)
    assert "<s>Question: what is two plus two? Answer:[[ four.</s>]]" in report


def test_report_splits_packed_sequences_into_their_samples(tmp_path, word_tokenizer):
    rows = [{"prompt": "say", "completion": " hi"}, {"prompt": "say", "completion": " bye"}]
    dataset = build(tmp_path, rows, word_tokenizer, seq_len=16, packing=True)
    report = render_report(dataset, word_tokenizer, color=False)
    assert "── sequence 1 of 1 ── 2 samples packed (16 tokens, 4 trained)" in report
    assert "<s> say[[ hi </s>]]" in report and "<s> say[[ bye </s>]]" in report
    assert "training sequences: 1 of 16 tokens (50.0% padding)" in report


def test_warning_no_eos(tmp_path, word_tokenizer):
    dataset = build(tmp_path, [{"text": "hello world"}], word_tokenizer, add_eos=False)
    report = render_report(dataset, word_tokenizer, color=False)
    assert "1 of 1 samples have no EOS among their trained tokens" in report


def test_warning_everything_masked(tmp_path, word_tokenizer):
    rows = [{"messages": [{"role": "user", "content": "say hi"}]}] * 2
    dataset = build(tmp_path, rows, word_tokenizer)
    assert dataset.examples == [] and dataset.stats.dropped == 2
    report = render_report(dataset, word_tokenizer, color=False)
    expected = "none of the 2 rows has a trained token left (2 without an assistant turn)"
    assert f"every token is masked: {expected}" in report


@pytest.mark.parametrize("row", [{"prompt": "say", "completion": " hi"}, {"instruction": "say", "output": "hi"},
                                 {"text": "say hi"}])
def test_no_chat_template_warning_for_formats_without_one(tmp_path, row):
    tokenizer = make_word_tokenizer(chat_template=None)
    dataset = build(tmp_path, [row], tokenizer, seq_len=128)
    assert dataset.examples and not any("chat template" in warning for warning in dataset.warnings)
    assert "chat template" not in render_report(dataset, tokenizer, color=False)


def test_chat_data_without_a_chat_template_is_refused(tmp_path):
    tokenizer = make_word_tokenizer(chat_template=None)
    rows = [{"messages": [{"role": "user", "content": "say"}, {"role": "assistant", "content": "hi"}]}]
    with pytest.raises(DataError, match="needs the tokenizer's chat template"):
        build(tmp_path, rows, tokenizer)


def test_warning_alpaca_with_a_chat_template(tmp_path, word_tokenizer):
    dataset = build(tmp_path, [{"instruction": "say hi", "output": "hi"}], word_tokenizer, seq_len=128)
    assert any("rendered with the Alpaca prompt" in warning for warning in dataset.warnings)


def test_warning_many_truncated(tmp_path, word_tokenizer):
    rows = [{"text": "a b c d e f g h"}] * 3 + [{"text": "a"}] * 2
    dataset = build(tmp_path, rows, word_tokenizer, seq_len=6)
    assert dataset.stats.truncated == 3
    report = render_report(dataset, word_tokenizer, color=False)
    assert "3 of 5 rows (60%) are longer than seq_len=6 and were truncated (p95 length 10)" in report


def test_report_shows_trained_tokens_per_sample_and_what_truncation_cuts(tmp_path, word_tokenizer):
    rows = [
        {"prompt": "say", "completion": " hi"},               # <s> say hi </s>: 2 trained
        {"prompt": "what is", "completion": " two"},          # <s> what is two </s>: 2 trained
        {"prompt": "say", "completion": " a b c d e f"},      # 9 tokens, 7 trained: cut to 6 keeps 4
        {"prompt": "a b c d e f g", "completion": " hi"},     # 10 tokens: cut to 6 keeps no trained token
    ]  # fmt: skip
    dataset = build(tmp_path, rows, word_tokenizer, seq_len=6)
    stats = dataset.stats
    assert stats.trained_lengths == [2, 2, 4]
    assert (stats.truncated, stats.truncated_lost_trained, stats.dropped_truncated) == (2, 2, 1)
    assert (stats.trained_tokens, stats.trained_tokens_cut) == (8, 5)
    report = render_report(dataset, word_tokenizer, color=False)
    assert "trained tokens per sample: min 2   p5 2   mean 2.7   p50 2   max 4" in report
    assert ("truncated by seq_len=6: 2 of 4 rows; 2 lose trained tokens (1 lose all of them and are dropped); "
            "5 trained tokens cut (38.5%)") in report
    assert "dropped: 1 (1 cut by seq_len to no trained token)" in report


def test_report_says_when_limit_leaves_rows_out(tmp_path, word_tokenizer):
    rows = [{"text": "hello world"}] * 5
    report = render_report(build(tmp_path, rows, word_tokenizer, limit=2), word_tokenizer, color=False)
    assert "rows: 2 (of 5 read)   kept: 2" in report
    assert "truncated by seq_len=64: 0 of 2 rows\n" in report
