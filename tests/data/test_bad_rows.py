"""Corrupt and truncated files: one-line errors naming file and line or byte offset; on_bad_rows: skip."""

from __future__ import annotations

import json
import re

import pytest
from data_helpers import make_word_tokenizer, write_rows

from nibbletune.data import BadRows, DataError, build_dataset, json_stream, load_records
from nibbletune.data.records import KEPT_REASONS

# non-ASCII text, so that byte offsets differ from character offsets
ROWS = [{"text": "héllo wörld"}, {"text": "what is two plus two"}, {"text": "中文 hello"}, {"text": "a b c"}]


def json_array(rows: list[dict]) -> tuple[str, list[int]]:
    """``rows`` as an indented JSON list, and the byte offset at which each row starts."""
    pieces, starts, size = [], [], len("[\n  ")
    for row in rows:
        text = json.dumps(row, ensure_ascii=False)
        starts.append(size)
        pieces.append(text)
        size += len(text.encode("utf-8")) + len(",\n  ")
    return "[\n  " + ",\n  ".join(pieces) + "\n]\n", starts


def write(path, text: str):
    path.write_bytes(text.encode("utf-8"))
    return path


def cut_inside_row(text: str, starts: list[int], row_index: int) -> bytes:
    """The file's bytes cut a few bytes into row ``row_index`` (0-based)."""
    return text.encode("utf-8")[: starts[row_index] + 5]


def test_truncated_json_list_names_the_byte_offsets_and_the_rows_kept(tmp_path):
    text, starts = json_array(ROWS)
    path = tmp_path / "data.json"
    path.write_bytes(cut_inside_row(text, starts, 2))
    size = starts[2] + 5
    expected = (f"{path}: row 3: the file ends at byte {size} inside this element, which starts at byte "
                f"{starts[2]} (line 4): truncated file? (the 2 complete rows before it can be kept with "
                "on_bad_rows: skip)")
    with pytest.raises(DataError) as caught:
        load_records(path)
    assert str(caught.value) == expected
    assert "\n" not in str(caught.value)


def test_skip_recovers_every_complete_row_before_the_cut(tmp_path):
    text, starts = json_array(ROWS)
    path = tmp_path / "data.json"
    path.write_bytes(cut_inside_row(text, starts, 3))
    bad_rows = BadRows("skip")
    records = load_records(path, bad_rows=bad_rows)
    assert [record.fields for record in records] == ROWS[:3]
    assert [record.source for record in records] == [f"{path}: row {n}" for n in (1, 2, 3)]
    assert bad_rows.count == 1
    assert f"row 4: the file ends at byte {starts[3] + 5} inside this element" in bad_rows.first_reasons[0]
    assert "the 3 complete rows before it are kept" in bad_rows.first_reasons[0]


def test_skip_reports_the_cut_in_the_dataset_warnings(tmp_path, word_tokenizer):
    text, starts = json_array(ROWS)
    path = tmp_path / "data.json"
    path.write_bytes(cut_inside_row(text, starts, 3))
    dataset = build_dataset(path, word_tokenizer, seq_len=32, on_bad_rows="skip")
    assert (dataset.stats.rows_read, dataset.stats.rows, dataset.stats.bad_rows) == (3, 3, 1)
    assert len(dataset.examples) == 3
    assert dataset.warnings[0] == "on_bad_rows: skip left out 1 bad row; nothing is trained on them"
    assert dataset.warnings[1].startswith(f"skipped {path}: row 4: the file ends at byte {starts[3] + 5}")


@pytest.mark.parametrize("chunk_bytes", [1, 2, 3, 7, 64])
def test_json_rows_and_problems_do_not_depend_on_the_chunk_size(tmp_path, monkeypatch, chunk_bytes):
    text, starts = json_array(ROWS)
    corrupt = text.replace('"what is two plus two"', "what is two plus two")  # row 2: a bare word
    files = {"whole": text, "cut": cut_inside_row(text, starts, 3).decode("utf-8", "ignore"), "corrupt": corrupt,
             "bom": "\ufeff" + text, "cut mid-character": text.encode("utf-8")[: text.encode().index("中".encode()) + 1]}

    def read(contents):
        path = tmp_path / "data.json"
        path.write_bytes(contents if isinstance(contents, bytes) else contents.encode("utf-8"))
        bad_rows = BadRows("skip")
        return [record.fields for record in load_records(path, bad_rows=bad_rows)], bad_rows.first_reasons

    expected = {name: read(contents) for name, contents in files.items()}
    monkeypatch.setattr(json_stream, "CHUNK_BYTES", chunk_bytes)
    assert {name: read(contents) for name, contents in files.items()} == expected
    assert expected["whole"] == (ROWS, []) and expected["bom"] == (ROWS, [])
    assert expected["corrupt"][0] == [ROWS[0], *ROWS[2:]]
    assert expected["cut mid-character"][0] == ROWS[:2]


def test_corrupt_element_names_its_byte_offset_and_skip_reads_on_after_it(tmp_path):
    text, starts = json_array(ROWS)
    path = write(tmp_path / "data.json", text.replace('"what is two plus two"', "what is two plus two"))
    error_at = starts[1] + len('{"text": ')
    with pytest.raises(DataError, match=re.escape(f"{path}: row 2: invalid JSON at byte {error_at} (line 3): "
                                                  "Expecting value")):
        load_records(path)
    bad_rows = BadRows("skip")
    assert [record.fields for record in load_records(path, bad_rows=bad_rows)] == [ROWS[0], *ROWS[2:]]
    assert [record.source for record in load_records(path, bad_rows=BadRows("skip"))][-1] == f"{path}: row 4"
    assert bad_rows.count == 1


def test_corruption_that_unbalances_brackets_stops_reading_and_says_so(tmp_path):
    path = write(tmp_path / "data.json", '[{"text": "a"}, {"text": "b", {"text": "c"}, {"text": "d"}]')
    bad_rows = BadRows("skip")
    assert [record.fields for record in load_records(path, bad_rows=bad_rows)] == [{"text": "a"}]
    [reason] = bad_rows.first_reasons
    assert reason.startswith(f"{path}: row 2: invalid JSON at byte 30 (line 1): Expecting property name")
    assert reason.endswith("where the row ends cannot be found, so the rest of the file is not read")


def test_list_cut_after_a_complete_row_keeps_every_row(tmp_path):
    path = write(tmp_path / "data.json", '[{"text": "a"},\n {"text": "b"}')
    with pytest.raises(DataError, match=re.escape(f"{path}: row 3: the file ends at byte 30, after element 2, "
                                                  "before the list is closed: truncated file?")):
        load_records(path)
    assert [record.fields["text"] for record in load_records(path, bad_rows=BadRows("skip"))] == ["a", "b"]


def test_truncated_list_under_data_key(tmp_path):
    text, starts = json_array(ROWS)
    path = tmp_path / "data.json"
    path.write_bytes(b'{"version": 2, "data": ' + cut_inside_row(text, starts, 1))
    assert [record.fields for record in load_records(path, bad_rows=BadRows("skip"))] == ROWS[:1]
    with pytest.raises(DataError, match=r"row 2: the file ends at byte \d+ inside this element"):
        load_records(path)


@pytest.mark.parametrize("contents, pattern", [
    (b'[{"text": "a"}] [{"text": "b"}]', r"unexpected text after the list at byte 16 \(line 1\)"),
    (b'[{"text": "\xff"}]', r"not UTF-8 text at byte 11"),
    (b'"text"', r'expected a JSON list of objects or \{"data": \[...\]\}, got str'),
    (b'{"rows": []}', r'expected a JSON list of objects or \{"data": \[...\]\}, got an object without a "data" list'),
    (b'[{"text": "a"} {"text": "b"}]', r"expected ',' or '\]' after element 1 of the list, found '\{' at byte 15"),
])  # fmt: skip
@pytest.mark.parametrize("on_bad_rows", ["error", "skip"])
def test_a_file_that_is_not_a_json_list_is_an_error_either_way(tmp_path, contents, pattern, on_bad_rows):
    path = tmp_path / "data.json"
    path.write_bytes(contents)
    with pytest.raises(DataError, match=re.escape(f"{path}: ") + pattern):
        load_records(path, bad_rows=BadRows(on_bad_rows))


def test_jsonl_bad_lines_are_named_by_line_and_skipped_on_request(tmp_path):
    path = tmp_path / "data.jsonl"
    lines = ['{"text": "a"}', '{"text": oops}', "[1, 2]", b'{"text": "\xff"}', '{"txt": "d"}', '{"text": "e"}',
             '{"text": "cut']
    path.write_bytes(b"\n".join(line if isinstance(line, bytes) else line.encode() for line in lines))
    with pytest.raises(DataError, match=re.escape(f"{path}:2: invalid JSON (Expecting value at column 10)")):
        load_records(path)
    bad_rows = BadRows("skip")
    records = load_records(path, bad_rows=bad_rows)
    assert [(record.source, record.fields["text"]) for record in records] == [(f"{path}:1", "a"), (f"{path}:6", "e")]
    assert bad_rows.count == 5
    assert bad_rows.first_reasons == [  # rows that cannot be read, then rows without the format's columns
        f"{path}:2: invalid JSON (Expecting value at column 10)",
        f"{path}:3: expected a JSON object with named columns, got list",
        f"{path}:4: not UTF-8 text (at column 11)",
        f"{path}:7: invalid JSON (Unterminated string starting at column 10); the file ends inside this line: "
        "truncated?",
        f"{path}:5: missing column 'text' for format 'text' (row has ['txt'])",
    ]


def test_skip_detects_the_format_from_the_first_row_that_tells_it(tmp_path, word_tokenizer):
    path = write(tmp_path / "data.jsonl", '{"question": "?"}\n{"prompt": "say", "completion": " hi"}\n')
    with pytest.raises(DataError, match="cannot tell the format"):
        build_dataset(path, word_tokenizer, seq_len=16)
    dataset = build_dataset(path, word_tokenizer, seq_len=16, on_bad_rows="skip")
    assert (dataset.stats.format, dataset.stats.rows, dataset.stats.bad_rows) == ("completion", 1, 1)


def test_a_file_of_bad_rows_only_has_no_usable_rows(tmp_path):
    path = write(tmp_path / "data.jsonl", "oops\n[1]\n")
    with pytest.raises(DataError, match=re.escape(f"{path}: no usable rows (2 bad rows skipped; the first: {path}:1")):
        load_records(path, bad_rows=BadRows("skip"))


def test_bad_rows_counts_every_row_and_keeps_the_first_reasons(tmp_path):
    path = write(tmp_path / "data.jsonl", "oops\n" * (KEPT_REASONS + 3) + '{"text": "a"}\n')
    bad_rows = BadRows("skip")
    assert len(load_records(path, bad_rows=bad_rows)) == 1
    assert bad_rows.count == KEPT_REASONS + 3
    assert [reason.split(": ")[0] for reason in bad_rows.first_reasons] == [
        f"{path}:{n}" for n in range(1, KEPT_REASONS + 1)
    ]


def test_conversations_the_template_refuses_are_bad_rows(tmp_path):
    template = (
        "{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
        "<|im_start|> {{ m.role }} {{ m.content }} <|im_end|> {% endfor %}"
        "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}"
    )
    rows = [{"messages": [{"role": "system", "content": "you are helpful"}, {"role": "user", "content": "hi"},
                          {"role": "assistant", "content": "hi"}]},
            {"messages": [{"role": "user", "content": "say hi"}, {"role": "assistant", "content": "hi"}]}]
    path = write_rows(tmp_path / "data.jsonl", rows)
    tokenizer = make_word_tokenizer(template)
    with pytest.raises(DataError, match=re.escape(f"{path}:1: the chat template failed on this conversation")):
        build_dataset(path, tokenizer, seq_len=32)
    dataset = build_dataset(path, tokenizer, seq_len=32, on_bad_rows="skip")
    stats = dataset.stats
    assert (stats.rows_read, stats.rows, stats.kept, stats.bad_rows) == (2, 1, 1, 1)
    assert any("no system role" in warning for warning in dataset.warnings)


def test_on_bad_rows_must_be_error_or_skip(tmp_path, word_tokenizer):
    path = write_rows(tmp_path / "data.jsonl", ROWS)
    with pytest.raises(DataError, match="on_bad_rows must be one of error, skip, got 'ignore'"):
        build_dataset(path, word_tokenizer, seq_len=16, on_bad_rows="ignore")


def test_config_key_data_on_bad_rows():
    from nibbletune.training.config import ConfigError, load_config

    base = ["model=m", "data.path=d.json", "output_dir=o", "train.max_steps=1"]
    assert load_config(None, base).data.on_bad_rows == "error"
    config = load_config(None, [*base, "data.on_bad_rows=skip", "data.format=sharegpt"])
    assert (config.data.on_bad_rows, config.data.format) == ("skip", "sharegpt")
    with pytest.raises(ConfigError, match="on_bad_rows"):
        load_config(None, [*base, "data.on_bad_rows=ignore"])


def test_data_command_skips_bad_rows_and_shows_them(tmp_path, word_tokenizer, capsys):
    from nibbletune.cli.main import main

    word_tokenizer.save_pretrained(tmp_path / "model")
    text, starts = json_array(ROWS)
    path = tmp_path / "data.json"
    path.write_bytes(cut_inside_row(text, starts, 3))
    assert main(["data", str(path), "--model", str(tmp_path / "model"), "--no-color"]) == 2
    assert "row 4: the file ends at byte" in capsys.readouterr().err
    assert main(["data", str(path), "--model", str(tmp_path / "model"), "--no-color", "--on-bad-rows", "skip"]) == 0
    report = capsys.readouterr().out
    assert "bad rows skipped: 1 (on_bad_rows: skip; see the warnings)" in report
    assert f"! skipped {path}: row 4: the file ends at byte {starts[3] + 5}" in report
