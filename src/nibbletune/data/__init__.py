"""The data stage: dataset files -> tokenized, masked, optionally packed training samples.

``build_dataset`` runs the stages, one module each:

1. ``records.py``   read ``.jsonl`` / ``.json`` / ``.csv`` / ``.parquet`` rows, each with its ``file:line``;
2. ``formats.py``   detect or check the format and render each row to trained / untrained text segments;
3. ``tokenize.py``  tokenize, mask (labels ``-100``), add BOS/EOS, truncate to ``seq_len``;
4. ``packing.py``   optionally pack samples into ``seq_len`` sequences; ``collate`` batches them;
5. ``report.py``    statistics, warnings for classic mistakes, and the ``nibbletune data`` report.

Errors a user can cause (bad rows, unknown format, missing chat template) raise :class:`DataError`, a
``NibbletuneError``, with one line naming the file and row. Problems that still leave something to
train on (truncation, missing EOS, dropped rows) become ``TokenizedDataset.warnings`` instead: a
dataset with no sample left is returned (with a warning) so the report can show why; the training
loop refuses it.
"""

from __future__ import annotations

from pathlib import Path

from torch.utils.data import Dataset

from nibbletune.data.formats import (
    FORMATS,
    Rendered,
    detect_format,
    load_records,
    render,
    require_chat_template,
)
from nibbletune.data.packing import collate, flatten_packed, pack
from nibbletune.data.records import DataError, Record
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
) -> TokenizedDataset:
    """Read, render, tokenize, mask, truncate and optionally pack the dataset at ``path``.

    ``format``: ``"auto"`` (from the first row's columns) or one of :data:`FORMATS`. ``limit``: use only
    the first ``limit`` rows. See the module docstrings for each stage's choices.
    """
    if seq_len < 2:
        raise DataError(f"seq_len must be at least 2 tokens, got {seq_len}")
    if limit is not None and limit < 1:
        raise DataError(f"limit must be a positive number of rows, got {limit}")
    records = load_records(path, format)  # checks the format name first
    if limit is not None:
        records = records[:limit]
    if format == "auto":
        format = detect_format(records[0].fields)
    if format == "chat":
        require_chat_template(tokenizer)
    info = TokenizerInfo.probe(tokenizer)

    rendered: list[Rendered] = [render(record.fields, format, tokenizer, record.source) for record in records]
    examples = tokenize_rendered(rendered, [record.source for record in records], tokenizer, info, add_eos)

    stats = DataStats(format=format, seq_len=seq_len, rows=len(records), packed=packing)
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
            trained_tokens = fitted.trained_tokens
            if not trained_tokens:
                stats.dropped_truncated += 1
                continue
        elif not has_stop_token(example.labels, info):
            stats.no_eos += 1
        kept.append(fitted)
        stats.trained_tokens += trained_tokens
        stats.total_tokens += len(fitted.input_ids)
    stats.kept = len(kept)

    if packing:
        kept = pack(kept, seq_len, info.pad_token_id)
    stats.sequences = len(kept)
    return TokenizedDataset(kept, stats, find_warnings(stats, tokenizer), info.pad_token_id)
