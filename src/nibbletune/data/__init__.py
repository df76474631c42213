"""The data stage: dataset files -> tokenized, masked, optionally packed training samples.

``build_dataset`` runs the stages, one module each:

1. ``records.py``   read ``.jsonl`` / ``.json`` / ``.csv`` / ``.parquet`` rows, each with its ``file:line``
                    (``json_stream.py`` streams a ``.json`` list element by element);
2. ``formats.py``   detect or check the format and render each row to trained / untrained text segments
                    (``conversations.py``: chat and ShareGPT turns, empty assistant turns);
3. ``tokenize.py``  tokenize, mask (labels ``-100``), add BOS/EOS, truncate to ``seq_len``;
4. ``packing.py``   optionally pack samples into ``seq_len`` sequences; ``collate`` batches them;
5. ``report.py``    statistics, warnings for classic mistakes, and the ``nibbletune data`` report.

Errors a user can cause (bad rows, unknown format, missing chat template) raise :class:`DataError`, a
``NibbletuneError``, with one line naming the file and row (or byte offset). With ``on_bad_rows="skip"``
rows that cannot be read or used are left out instead, counted, and the first few reasons listed in the
warnings. Problems that still leave something to train on (truncation, missing EOS, dropped rows, empty
assistant turns) become ``TokenizedDataset.warnings``: a dataset with no sample left is returned (with a
warning) so the report can show why; the training loop refuses it.
"""

from __future__ import annotations

from pathlib import Path

from torch.utils.data import Dataset

from nibbletune.data.conversations import count_turns
from nibbletune.data.formats import (
    CHAT_FORMATS,
    FORMATS,
    Rendered,
    detect_format,
    load_checked_records,
    load_records,
    render,
    require_chat_template,
)
from nibbletune.data.packing import collate, flatten_packed, pack
from nibbletune.data.records import ON_BAD_ROWS, BadRows, DataError, Record
from nibbletune.data.report import DataStats, find_warnings, render_example, render_report
from nibbletune.data.tokenize import (
    IGNORE_INDEX,
    Example,
    TokenizerInfo,
    has_stop_token,
    tokenize_rendered,
    truncate,
)

__all__ = [
    "FORMATS",
    "IGNORE_INDEX",
    "ON_BAD_ROWS",
    "BadRows",
    "DataError",
    "DataStats",
    "Example",
    "Record",
    "TokenizedDataset",
    "build_dataset",
    "collate",
    "detect_format",
    "flatten_packed",
    "load_records",
    "render_example",
    "render_report",
]


class TokenizedDataset(Dataset):
    """Training samples ready for :func:`collate`, with the statistics and warnings of building them."""

    def __init__(
        self, examples: list[Example], stats: DataStats, warnings: list[str], pad_token_id: int
    ) -> None:
        self.examples = examples
        self.stats = stats
        self.warnings = warnings
        self.pad_token_id = pad_token_id
        """The id ``packing`` padded with (the tokenizer's pad token, else EOS, else 0)."""

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> Example:
        return self.examples[index]


def build_dataset(
    path: str | Path,
    tokenizer,
    seq_len: int,
    format: str = "auto",
    packing: bool = False,
    add_eos: bool = True,
    limit: int | None = None,
    on_bad_rows: str = "error",
) -> TokenizedDataset:
    """Read, render, tokenize, mask, truncate and optionally pack the dataset at ``path``.

    ``format``: ``"auto"`` (from the first row's columns) or one of :data:`FORMATS`. ``limit``: use only
    the first ``limit`` usable rows (all of them are still read and checked). ``on_bad_rows``: ``"error"``
    raises on the first row that cannot be read or used (invalid or truncated JSON, missing or mistyped
    columns, a conversation the chat template refuses); ``"skip"`` leaves such rows out and counts them.
    See the module docstrings for each stage's choices.
    """
    if seq_len < 2:
        raise DataError(f"seq_len must be at least 2 tokens, got {seq_len}")
    if limit is not None and limit < 1:
        raise DataError(f"limit must be a positive number of rows, got {limit}")
    bad_rows = BadRows(on_bad_rows)
    format, records = load_checked_records(path, format, bad_rows)  # checks the format name first
    stats = DataStats(format=format, seq_len=seq_len, rows_read=len(records), packed=packing)
    if limit is not None:
        records = records[:limit]
    if format in CHAT_FORMATS:
        require_chat_template(tokenizer, format)
    info = TokenizerInfo.probe(tokenizer)

    bad_before_rendering = bad_rows.count
    rendered: list[Rendered] = []
    sources: list[str] = []
    for record in records:
        if format in CHAT_FORMATS and not _count_conversation(record.fields["messages"], stats):
            continue
        try:
            rendered.append(render(record.fields, format, tokenizer, record.source))
        except DataError as error:
            bad_rows.add(str(error))
            continue
        sources.append(record.source)
    stats.rows = len(records) - (bad_rows.count - bad_before_rendering)
    stats.bad_rows, stats.bad_row_reasons = bad_rows.count, bad_rows.first_reasons
    examples = tokenize_rendered(rendered, sources, tokenizer, info, add_eos)

    kept: list[Example] = []
    for example in examples:
        stats.lengths.append(len(example.input_ids))
        trained_tokens = example.trained_tokens
        if not trained_tokens:
            stats.dropped_no_trained += 1
            continue
        fitted = truncate(example, seq_len)
        if fitted is not example:
            stats.truncated += 1
            trained_left = fitted.trained_tokens
            if trained_left < trained_tokens:
                stats.truncated_lost_trained += 1
                stats.trained_tokens_cut += trained_tokens - trained_left
            trained_tokens = trained_left
            if not trained_tokens:
                stats.dropped_truncated += 1
                continue
        elif not has_stop_token(example.labels, info):
            stats.no_eos += 1
        kept.append(fitted)
        stats.trained_lengths.append(trained_tokens)
        stats.trained_tokens += trained_tokens
        stats.total_tokens += len(fitted.input_ids)
    stats.kept = len(kept)

    if packing:
        kept = pack(kept, seq_len, info.pad_token_id)
    stats.sequences = len(kept)
    return TokenizedDataset(kept, stats, find_warnings(stats, tokenizer), info.pad_token_id)


def _count_conversation(messages: list[dict], stats: DataStats) -> bool:
    """Count the conversation's empty assistant turns; False, counted as dropped, when it has none to train."""
    turns = count_turns(messages)
    stats.empty_assistant_turns += turns.empty_assistant_turns
    if turns.trained_assistant_turns:
        return True
    if not turns.turns:
        stats.dropped_empty_conversation += 1
    elif not turns.assistant_turns:
        stats.dropped_no_assistant += 1
    else:
        stats.dropped_empty_assistant += 1
    return False
