"""What a tokenized dataset looks like: counts, token lengths, warnings, and rendered samples.

This is the report behind ``nibbletune data``: look at what the model will actually be trained on
before spending hours on it. :func:`render_report` shows a few samples with their trained tokens
highlighted (green with ``color``, else between ``[[`` and ``]]``), the statistics, and the warnings
:func:`find_warnings` raises for classic mistakes: no EOS among the trained tokens, every token
masked, many samples truncated, alpaca data rendered past the model's chat template.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from nibbletune.data.tokenize import IGNORE_INDEX, Example

TRUNCATION_WARN_FRACTION = 0.1
"""Warn when more than this fraction of rows is longer than ``seq_len``."""

_TRAINED_ON, _TRAINED_OFF = "\x1b[1;32m", "\x1b[0m"
_DIM_ON = "\x1b[2m"


@dataclass
class DataStats:
    """Counts and token lengths of a dataset; lengths are per row before truncation (and packing)."""

    format: str
    seq_len: int
    rows: int = 0
    """Rows read (after ``limit``)."""
    kept: int = 0
    """Samples that go into training (before packing)."""
    truncated: int = 0
    """Rows longer than ``seq_len``, cut to it (including those then dropped)."""
    dropped_no_trained: int = 0
    """Rows with no trained token at all (e.g. a conversation without an assistant turn)."""
    dropped_truncated: int = 0
    """Rows whose trained tokens all lay past ``seq_len``."""
    no_eos: int = 0
    """Kept, untruncated samples without EOS (or another stop token) among their trained tokens."""
    lengths: list[int] = field(default_factory=list, repr=False)
    trained_tokens: int = 0
    """Trained tokens in the kept samples, after truncation."""
    total_tokens: int = 0
    """All tokens in the kept samples, after truncation (padding not counted)."""
    packed: bool = False
    sequences: int = 0
    """Training sequences: samples, or packed sequences when packing."""

    @property
    def dropped(self) -> int:
        """Rows left out: ``dropped_no_trained + dropped_truncated``."""
        return self.dropped_no_trained + self.dropped_truncated

    @property
    def trained_token_fraction(self) -> float:
        return self.trained_tokens / self.total_tokens if self.total_tokens else 0.0

    @property
    def padding_fraction(self) -> float:
        """Share of packed sequence positions that are padding (0 when not packing)."""
        if not self.packed or not self.sequences:
            return 0.0
        return 1.0 - self.total_tokens / (self.sequences * self.seq_len)

    @property
    def length_min(self) -> int:
        return min(self.lengths, default=0)

    @property
    def length_max(self) -> int:
        return max(self.lengths, default=0)

    @property
    def length_mean(self) -> float:
        return sum(self.lengths) / len(self.lengths) if self.lengths else 0.0

    @property
    def length_p50(self) -> int:
        return _percentile(self.lengths, 0.50)

    @property
    def length_p95(self) -> int:
        return _percentile(self.lengths, 0.95)


def _percentile(values: list[int], quantile: float) -> int:
    """Nearest-rank percentile: the smallest value with at least ``quantile`` of the values at or below it."""
    if not values:
        return 0
    ordered = sorted(values)
    return ordered[max(0, math.ceil(quantile * len(ordered)) - 1)]


def find_warnings(stats: DataStats, tokenizer) -> list[str]:
    """One line per classic mistake visible in ``stats``."""
    warnings = []
    if stats.rows and not stats.kept:
        causes = []
        if stats.dropped_no_trained:
            hint = ", e.g. no assistant turn" if stats.format == "chat" else ""
            causes.append(f"{stats.dropped_no_trained} have none{hint}")
        if stats.dropped_truncated:
            causes.append(f"{stats.dropped_truncated} have them all past seq_len={stats.seq_len}")
        warnings.append(
            f"every token is masked: none of the {stats.rows} rows has a trained token left "
            f"({'; '.join(causes)}); nothing would be learned"
        )
    elif stats.dropped_no_trained:
        warnings.append(
            f"{stats.dropped_no_trained} of {stats.rows} rows have no trained token "
            "(e.g. no assistant turn) and were dropped"
        )
    if stats.no_eos:
        what = "EOS or end-of-turn token" if stats.format == "chat" else "EOS"
        warnings.append(
            f"{stats.no_eos} of {stats.kept} samples have no {what} among their trained tokens: "
            "the model will not learn to stop (add_eos=False, or a template without one?)"
        )
    if stats.rows and stats.truncated / stats.rows > TRUNCATION_WARN_FRACTION:
        warnings.append(
            f"{stats.truncated} of {stats.rows} rows ({stats.truncated / stats.rows:.0%}) are longer than "
            f"seq_len={stats.seq_len} and were truncated (p95 length {stats.length_p95}); "
            "raise seq_len or shorten the data"
        )
    elif stats.dropped_truncated:
        warnings.append(
            f"{stats.dropped_truncated} rows were dropped: all their trained tokens lie past "
            f"seq_len={stats.seq_len}"
        )
    # A missing chat template matters only for chat data, where build_dataset refuses it (DataError);
    # text, completion and alpaca rows are rendered without one, so there is nothing to warn about.
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if stats.format == "alpaca" and has_template:
        warnings.append(
            "the tokenizer has a chat template, but alpaca rows are rendered with the Alpaca prompt instead: "
            "chat front-ends will prompt the model in a format it was not tuned on; use 'messages' rows"
        )
    return warnings


def render_report(dataset, tokenizer, num_samples: int = 3, color: bool = True) -> str:
    """A human-readable report on ``dataset`` (a ``TokenizedDataset``): samples, statistics, warnings."""
    stats: DataStats = dataset.stats
    lines = []
    shown = dataset.examples[:num_samples]
    for number, example in enumerate(shown, start=1):
        parts = _split_packed(example)
        if example.position_ids is None:
            lines.append(f"── sample {number} of {len(dataset.examples)} ── {_describe(example)}")
        else:
            trained = sum(part.trained_tokens for part in parts)
            lines.append(
                f"── sequence {number} of {len(dataset.examples)} ── {len(parts)} samples packed "
                f"({len(example.input_ids)} tokens, {trained} trained)"
            )
        for part in parts:
            if part is not example:
                lines.append(f"   ┄ {_describe(part)}")
            lines.append(render_example(part, tokenizer, color))
        lines.append("")
    legend = f"{_TRAINED_ON}trained{_TRAINED_OFF}" if color else "[[trained]]"
    lines.append(f"(text shown {legend} is trained; the rest is masked with -100)")
    lines.append("")
    lines += _stats_lines(stats)
    lines.append("")
    if dataset.warnings:
        lines.append(f"warnings ({len(dataset.warnings)}):")
        lines += [f"  ! {warning}" for warning in dataset.warnings]
    else:
        lines.append("warnings: none")
    return "\n".join(lines)


def _describe(example: Example) -> str:
    return f"{example.source}  ({len(example.input_ids)} tokens, {example.trained_tokens} trained)"


def _split_packed(example: Example) -> list[Example]:
    """The samples inside a packed sequence (padding tail left out); ``[example]`` when not packed."""
    if example.position_ids is None:
        return [example]
    starts = [index for index, position in enumerate(example.position_ids) if position == 0]
    sources = example.source.split(" + ")
    parts = []
    for number, start in enumerate(starts[: len(sources)]):
        end = starts[number + 1] if number + 1 < len(starts) else len(example.input_ids)
        parts.append(Example(example.input_ids[start:end], example.labels[start:end], None, sources[number]))
    return parts


def render_example(example: Example, tokenizer, color: bool = True) -> str:
    """The sample's text, trained runs highlighted (ANSI green, or ``[[ ]]`` without color)."""
    runs = []  # (first token, end token, trained)
    for index, label in enumerate(example.labels):
        trained = label != IGNORE_INDEX
        if runs and runs[-1][2] == trained:
            runs[-1] = (runs[-1][0], index + 1, trained)
        else:
            runs.append((index, index + 1, trained))
    pieces = []
    decoded = ""
    for start, end, trained in runs:
        # decode growing prefixes and take the difference, so runs keep their leading spaces
        prefix = tokenizer.decode(example.input_ids[:end], skip_special_tokens=False)
        if prefix.startswith(decoded):
            text = prefix[len(decoded) :]
        else:
            text = tokenizer.decode(example.input_ids[start:end], skip_special_tokens=False)
        decoded = prefix
        if trained:
            pieces.append(f"{_TRAINED_ON}{text}{_TRAINED_OFF}" if color else f"[[{text}]]")
        else:
            pieces.append(f"{_DIM_ON}{text}{_TRAINED_OFF}" if color else text)
    return "".join(pieces)


def _stats_lines(stats: DataStats) -> list[str]:
    lines = [
        f"format: {stats.format}   seq_len: {stats.seq_len}   packing: {'on' if stats.packed else 'off'}",
        f"rows: {stats.rows}   kept: {stats.kept}   truncated: {stats.truncated}   dropped: {stats.dropped}"
        f" ({stats.dropped_no_trained} without trained tokens, {stats.dropped_truncated} cut by seq_len)",
        f"tokens per row: min {stats.length_min}   mean {stats.length_mean:.1f}   p50 {stats.length_p50}"
        f"   p95 {stats.length_p95}   max {stats.length_max}",
        f"trained tokens: {stats.trained_tokens} of {stats.total_tokens} "
        f"({stats.trained_token_fraction:.1%})",
    ]
    sequences = f"training sequences: {stats.sequences}"
    if stats.packed:
        sequences += f" of {stats.seq_len} tokens ({stats.padding_fraction:.1%} padding)"
    lines.append(sequences)
    return lines
