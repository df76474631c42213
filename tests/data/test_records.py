"""Reading jsonl / json / csv / parquet: the same rows give the same samples; bad rows name file and row."""

from __future__ import annotations

import json
import re

import pytest
from data_helpers import write_rows

from nibbletune.data import DataError, build_dataset, detect_format, load_records
from nibbletune.errors import NibbletuneError

ROWS = {
    "text": [{"text": "hello world"}, {"text": "what is two plus two"}],
    "completion": [
        {"prompt": "what is two plus two", "completion": " four"},
        {"prompt": "say", "completion": " hi"},
    ],
    "alpaca": [
        {"instruction": "say hi", "input": "you", "output": "hi there"},
        {"instruction": "say bye", "input": "", "output": "bye"},
    ],
    "chat": [
        {"messages": [{"role": "user", "content": "say hi"}, {"role": "assistant", "content": "hi there"}]},
        {"messages": [{"role": "system", "content": "you are helpful"}, {"role": "user", "content": "hello"},
                      {"role": "assistant", "content": "hi"}]},
    ],
}  # fmt: skip
SUFFIXES = [".jsonl", ".json", ".csv", ".parquet"]


@pytest.mark.parametrize("format", list(ROWS))
def test_every_file_type_gives_the_same_samples(tmp_path, word_tokenizer, format):
    datasets = [
        build_dataset(write_rows(tmp_path / f"data{suffix}", ROWS[format]), word_tokenizer, seq_len=128)
        for suffix in SUFFIXES
    ]
    reference = [(example.input_ids, example.labels) for example in datasets[0].examples]
    assert len(reference) == len(ROWS[format])
    for dataset in datasets:
        assert dataset.stats.format == format
        assert [(example.input_ids, example.labels) for example in dataset.examples] == reference


def test_sources_name_file_and_line_or_row(tmp_path):
    rows = ROWS["text"]
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text(json.dumps(rows[0]) + "\n\n" + json.dumps(rows[1]) + "\n")  # blank line skipped
    assert [r.source for r in load_records(jsonl)] == [f"{jsonl}:1", f"{jsonl}:3"]
    csv_path = write_rows(tmp_path / "data.csv", rows)
    assert [r.source for r in load_records(csv_path)] == [f"{csv_path}:2", f"{csv_path}:3"]
    for suffix in (".json", ".parquet"):
        path = write_rows(tmp_path / f"data{suffix}", rows)
        assert [r.source for r in load_records(path)] == [f"{path}: row 1", f"{path}: row 2"]


def test_json_with_data_key(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps({"data": ROWS["text"]}))
    assert [record.fields for record in load_records(path)] == ROWS["text"]


def test_csv_cells_stay_strings_and_multiline_cells_keep_line_numbers(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text('text\n"line one\nline two"\n42\n"  "\n', encoding="utf-8")
    with pytest.raises(DataError, match=re.escape(f"{path}:5: column 'text' is empty")):
        load_records(path)
    path.write_text('text\n"line one\nline two"\n42\n', encoding="utf-8")
    records = load_records(path)
    assert [record.fields["text"] for record in records] == ["line one\nline two", "42"]
    assert [record.source for record in records] == [f"{path}:2", f"{path}:4"]


def test_directory_and_glob(tmp_path):
    write_rows(tmp_path / "a.jsonl", ROWS["text"][:1])
    write_rows(tmp_path / "b.csv", ROWS["text"][1:])
    (tmp_path / "notes.txt").write_text("ignored")
    from_dir = load_records(tmp_path)
    assert [record.fields["text"] for record in from_dir] == [row["text"] for row in ROWS["text"]]
    from_glob = load_records(str(tmp_path / "*.jsonl"))
    assert [record.fields["text"] for record in from_glob] == [ROWS["text"][0]["text"]]
    with pytest.raises(DataError, match="matches no dataset files"):
        load_records(str(tmp_path / "*.parquet"))


def _bad_row_cases():
    """(suffix, rows or raw text, expected message pattern with {path})."""
    good = {"text": "hello"}
    return [
        (".jsonl", '{"text": "hello"}\n{"text": "hi"}\n{"text": oops}\n', r"{path}:3: invalid JSON"),
        (".jsonl", '{"text": "hello"}\n["hello"]\n', r"{path}:2: expected a JSON object"),
        (".json", '[{"text": "hello"},\n {"text": oops}]', r"{path}: row 2: invalid JSON at byte 30 \(line 2\)"),
        (".json", '{"rows": []}', r"{path}: expected a JSON list of objects"),
        (".jsonl", [good, {"txt": "hello"}], r"{path}:2: missing column 'text' for format 'text'"),
        (".csv", [good, good, {"text": ""}], r"{path}:4: column 'text' is empty"),
        (".parquet", [good, {"text": None}], r"{path}: row 2: column 'text' must be a string, got nothing"),
        (".json", [good, {"text": 3}], r"{path}: row 2: column 'text' must be a string, got int"),
        (".jsonl", [{"prompt": "a", "completion": "b"}, {"prompt": "a", "completion": " "}],
         r"{path}:2: column 'completion' is empty"),
        (".jsonl", [{"instruction": "a", "output": "b"}, {"instruction": "a", "output": "b", "input": 3}],
         r"{path}:2: column 'input' must be a string"),
        (".jsonl", [{"messages": "hello"}], r"{path}:1: column 'messages' is a string that is not"),
        (".jsonl", [{"messages": {"role": "user"}}],
         r"{path}:1: column 'messages' must be a list of \{role, content\} objects, got dict"),
        (".jsonl", [{"messages": [{"role": "user", "content": "hi"}, "hi"]}],
         r"{path}:1: messages\[1\] must be a \{role, content\} object, got str"),
        (".jsonl", [{"messages": [{"content": "hi"}]}], r"{path}:1: messages\[0\]: 'role' must be"),
        (".parquet", [{"messages": [{"role": "user", "content": "hi"}]},
                      {"messages": [{"role": "user", "content": None}]}],
         r"{path}: row 2: messages\[0\]: 'content' must be a string, got nothing"),
        (".csv", [{"messages": "[{\"role\": \"user\"}"}], r"{path}:2: column 'messages' is a string"),
        (".jsonl", [{"question": "hi"}], r"{path}:1: cannot tell the format from columns \['question'\]"),
    ]  # fmt: skip


@pytest.mark.parametrize("suffix, content, pattern", _bad_row_cases())
def test_bad_rows_name_file_and_line(tmp_path, suffix, content, pattern):
    path = tmp_path / f"data{suffix}"
    if isinstance(content, str):
        path.write_text(content)
    else:
        write_rows(path, content)
    with pytest.raises(DataError, match=pattern.replace("{path}", re.escape(str(path)))) as caught:
        load_records(path)
    assert isinstance(caught.value, NibbletuneError)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_empty_file_is_a_clear_error(tmp_path, suffix):
    path = tmp_path / f"empty{suffix}"
    if suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"text": pa.array([], pa.string())}), path)
    elif suffix == ".json":
        path.write_text("[]")
    else:
        path.write_text("" if suffix == ".jsonl" else "text\n")
    with pytest.raises(DataError, match=re.escape(f"{path}: file holds no rows")):
        load_records(path)


def test_missing_path_and_unknown_file_type(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_records(tmp_path / "nope.jsonl")
    (tmp_path / "data.txt").write_text("hello")
    with pytest.raises(DataError, match=r"unsupported file type '\.txt'"):
        load_records(tmp_path / "data.txt")


def test_unknown_format_lists_the_allowed_ones(tmp_path, word_tokenizer):
    path = write_rows(tmp_path / "data.jsonl", ROWS["text"])
    with pytest.raises(
        DataError,
        match="unknown data format 'oasst'; expected one of: auto, text, completion, alpaca, chat, sharegpt",
    ):
        build_dataset(path, word_tokenizer, seq_len=16, format="oasst")


def test_explicit_format_overrides_detection(tmp_path, word_tokenizer):
    rows = [{"text": "hello world", "prompt": "say", "completion": " hi"}]
    path = write_rows(tmp_path / "data.jsonl", rows)
    assert build_dataset(path, word_tokenizer, seq_len=16).stats.format == "completion"
    assert build_dataset(path, word_tokenizer, seq_len=16, format="text").stats.format == "text"


def test_detect_format():
    assert detect_format(["messages", "text"]) == "chat"
    assert detect_format(["instruction", "input", "output"]) == "alpaca"
    assert detect_format(["prompt", "completion", "id"]) == "completion"
    assert detect_format(["text", "id"]) == "text"
    with pytest.raises(DataError, match="cannot tell the format"):
        detect_format(["prompt"])
