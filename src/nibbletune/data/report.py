"""What a tokenized dataset looks like: counts, token lengths, warnings, and rendered samples.

This is the report behind ``nibbletune data``: look at what the model will actually be trained on
before spending hours on it. :func:`render_report` shows a few samples with their trained tokens
highlighted (green with ``color``, else between ``[[`` and ``]]``), the statistics (tokens and trained
tokens per sample, what ``seq_len`` truncates, rows dropped and why), and the warnings
:func:`find_warnings` raises for classic mistakes: no EOS among the trained tokens, every token
masked, many samples truncated, alpaca data rendered past the model's chat template, conversations
without an assistant turn to train, empty assistant turns, bad rows skipped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from nibbletune.data.formats import CHAT_FORMATS
from nibbletune.data.tokenize import IGNORE_INDEX, Example

TRUNCATION_WARN_FRACTION = 0.1
"""Warn when more than this fraction of rows is longer than ``seq_len``."""
REASONS_IN_WARNINGS = 3
"""Bad rows whose reasons the warnings name (``DataStats.bad_row_reasons`` keeps a few more)."""

_TRAINED_ON, _TRAINED_OFF = "\x1b[1;32m", "\x1b[0m"
_DIM_ON = "\x1b[2m"


@dataclass
class DataStats:
    """Counts and token lengths of a dataset; lengths are per row before truncation (and packing)."""

    format: str
    seq_len: int
    rows_read: int = 0
    """Usable rows in the files (bad rows left out), before ``limit``."""
    rows: int = 0
    """Rows used: the first ``limit`` usable ones (or all), less any the chat template refused when skipping
    bad rows. ``rows == kept + dropped``."""
    bad_rows: int = 0
    """Rows left out under ``on_bad_rows="skip"``: unreadable JSON, mistyped columns, refused by the template."""
    bad_row_reasons: list[str] = field(default_factory=list, repr=False)
    """The first few of them, each naming its file and line, row or byte offset."""
    kept: int = 0
    """Samples that go into training (before packing)."""
    truncated: int = 0
    """Rows longer than ``seq_len``, cut to it (including those then dropped)."""
    truncated_lost_trained: int = 0
    """Truncated rows that lost trained tokens to the cut (including those left with none, then dropped)."""
    trained_tokens_cut: int = 0
    """Trained tokens past ``seq_len``, lost to truncation."""
    dropped_empty_conversation: int = 0
    """Conversations with no turns at all (chat formats)."""
    dropped_no_assistant: int = 0
    """Conversations without an assistant turn (chat formats)."""
    dropped_empty_assistant: int = 0
    """Conversations whose assistant turns are all empty (chat formats)."""
    empty_assistant_turns: int = 0
    """Assistant turns with empty or whitespace-only content, left untrained (in kept and dropped rows)."""
    dropped_no_trained: int = 0
    """Rendered rows with no trained token at all."""
    dropped_truncated: int = 0
    """Rows whose trained tokens all lay past ``seq_len``."""
    no_eos: int = 0
    """Kept, untruncated samples without EOS (or another stop token) among their trained tokens."""
    lengths: list[int] = field(default_factory=list, repr=False)
    """Tokens per rendered row, before truncation."""
    trained_lengths: list[int] = field(default_factory=list, repr=False)
    """Trained (supervised) tokens per kept sample, after truncation."""
    trained_tokens: int = 0
    """Trained tokens in the kept samples, after truncation."""
    total_tokens: int = 0
    """All tokens in the kept samples, after truncation (padding not counted)."""
    packed: bool = False
    sequences: int = 0
    """Training sequences: samples, or packed sequences when packing."""

    @property
    def dropped_conversations(self) -> int:
        """Conversations left out for having no assistant turn to train."""
        return self.dropped_empty_conversation + self.dropped_no_assistant + self.dropped_empty_assistant

    @property
    def dropped(self) -> int:
        """Rows left out: conversations without a turn to train, rows without trained tokens, or cut to none."""
        return self.dropped_conversations + self.dropped_no_trained + self.dropped_truncated

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
    def row_lengths(self) -> LengthSummary:
        """Tokens per rendered row, before truncation: min, mean, percentiles, max."""
        return LengthSummary.of(self.lengths)

    @property
    def trained_per_sample(self) -> LengthSummary:
        """Trained tokens per kept sample (a low p5 means many nearly unsupervised samples)."""
        return LengthSummary.of(self.trained_lengths)


@dataclass(frozen=True)
class LengthSummary:
    """min, mean, nearest-rank percentiles and max of a list of token counts (zeros for an empty list)."""

    min: int
    mean: float
    p05: int
    p50: int
    p95: int
    max: int

    @classmethod
    def of(cls, values: list[int]) -> LengthSummary:
        """The summary of `values`."""
        mean = sum(values) / len(values) if values else 0.0
        return cls(min(values, default=0), mean, _percentile(values, 0.05), _percentile(values, 0.50),
                   _percentile(values, 0.95), max(values, default=0))


def _percentile(values: list[int], quantile: float) -> int:
    """Nearest-rank percentile: the smallest value with at least ``quantile`` of the values at or below it."""
    if not values:
        return 0
    ordered = sorted(values)
    return ordered[max(0, math.ceil(quantile * len(ordered)) - 1)]


def find_warnings(stats: DataStats, tokenizer) -> list[str]:
    """One line per classic mistake visible in ``stats``."""
    warnings = []
    if stats.bad_rows:
        rows = "1 bad row" if stats.bad_rows == 1 else f"{stats.bad_rows} bad rows"
        warnings.append(f"on_bad_rows: skip left out {rows}; nothing is trained on them")
        warnings += [f"skipped {reason}" for reason in stats.bad_row_reasons[:REASONS_IN_WARNINGS]]
    if stats.rows and not stats.kept:
        causes = _conversation_drops(stats)
        if stats.dropped_no_trained:
            causes.append(f"{stats.dropped_no_trained} have none")
        if stats.dropped_truncated:
            causes.append(f"{stats.dropped_truncated} have them all past seq_len={stats.seq_len}")
        warnings.append(
            f"every token is masked: none of the {stats.rows} rows has a trained token left "
            f"({'; '.join(causes)}); nothing would be learned"
        )
    else:
        if stats.dropped_conversations:
            warnings.append(f"{stats.dropped_conversations} of {stats.rows} conversations have no assistant turn "
                            f"to train and were dropped: {', '.join(_conversation_drops(stats))}")
        if stats.dropped_no_trained:
            warnings.append(f"{stats.dropped_no_trained} of {stats.rows} rows have no trained token and were dropped")
    if stats.empty_assistant_turns:
        warnings.append(f"{stats.empty_assistant_turns} assistant turns are empty (or only whitespace) and are not "
                        "trained; the other turns of their conversations are")
    if stats.no_eos:
        what = "EOS or end-of-turn token" if stats.format in CHAT_FORMATS else "EOS"
        warnings.append(
            f"{stats.no_eos} of {stats.kept} samples have no {what} among their trained tokens: "
            "the model will not learn to stop (add_eos=False, or a template without one?)"
        )
    if stats.rows and stats.truncated / stats.rows > TRUNCATION_WARN_FRACTION:
        warnings.append(
            f"{stats.truncated} of {stats.rows} rows ({stats.truncated / stats.rows:.0%}) are longer than "
            f"seq_len={stats.seq_len} and were truncated (p95 length {stats.row_lengths.p95}); "
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


def _conversation_drops(stats: DataStats) -> list[str]:
    """Why conversations were dropped, one phrase per cause that occurred."""
    causes = [
        (stats.dropped_empty_conversation, "empty (no turns)"),
        (stats.dropped_no_assistant, "without an assistant turn"),
        (stats.dropped_empty_assistant, "whose assistant turns are all empty"),
    ]
    return [f"{count} {what}" for count, what in causes if count]


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
    rows = f"rows: {stats.rows}"
    if stats.rows_read != stats.rows:
        rows += f" (of {stats.rows_read} read)"
    dropped = f"dropped: {stats.dropped}"
    causes = _conversation_drops(stats) + [
        f"{count} {what}"
        for count, what in ((stats.dropped_no_trained, "without trained tokens"),
                            (stats.dropped_truncated, "cut by seq_len to no trained token"))
        if count
    ]
    if causes:
        dropped += f" ({', '.join(causes)})"
    lines = [
        f"format: {stats.format}   seq_len: {stats.seq_len}   packing: {'on' if stats.packed else 'off'}",
        f"{rows}   kept: {stats.kept}   truncated: {stats.truncated}   {dropped}",
    ]
    if stats.bad_rows:
        lines.append(f"bad rows skipped: {stats.bad_rows} (on_bad_rows: skip; see the warnings)")
    if stats.empty_assistant_turns:
        lines.append(f"empty assistant turns: {stats.empty_assistant_turns} (not trained)")
    lengths, trained = stats.row_lengths, stats.trained_per_sample
    lines += [
        f"tokens per row: min {lengths.min}   mean {lengths.mean:.1f}   p50 {lengths.p50}   p95 {lengths.p95}"
        f"   max {lengths.max}",
        f"trained tokens per sample: min {trained.min}   p5 {trained.p05}   mean {trained.mean:.1f}"
        f"   p50 {trained.p50}   max {trained.max}",
        f"trained tokens: {stats.trained_tokens} of {stats.total_tokens} "
        f"({stats.trained_token_fraction:.1%})",
        _truncation_line(stats),
    ]
    sequences = f"training sequences: {stats.sequences}"
    if stats.packed:
        sequences += f" of {stats.seq_len} tokens ({stats.padding_fraction:.1%} padding)"
    lines.append(sequences)
    return lines


def _truncation_line(stats: DataStats) -> str:
    line = f"truncated by seq_len={stats.seq_len}: {stats.truncated} of {stats.rows} rows"
    if stats.truncated:
        line += (f"; {stats.truncated_lost_trained} lose trained tokens ({stats.dropped_truncated} lose all of them "
                 f"and are dropped); {stats.trained_tokens_cut} trained tokens cut "
                 f"({_share(stats.trained_tokens_cut, stats.trained_tokens + stats.trained_tokens_cut)})")
    return line


def _share(part: int, whole: int) -> str:
    return f"{part / whole:.1%}" if whole else "0.0%"
