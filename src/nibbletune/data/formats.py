"""Dataset formats: which columns a row holds, and how a row becomes text with trained spans.

Five formats, detected from the column names (``detect_format``, in this order) or named explicitly:

============  ==========================================  ==========================================
format        columns                                     trained text
============  ==========================================  ==========================================
chat          ``messages`` (list of ``{role, content}``)  each non-empty assistant turn, with its
                                                          end-of-turn token, as the tokenizer's chat
                                                          template renders it
sharegpt      ``conversations`` (list of ``{from,         as chat: the turns become messages
              value}``)                                   (``conversations.py`` maps the roles)
alpaca        ``instruction``, ``output``, opt. ``input`` the output, after :data:`ALPACA_PROMPT`
completion    ``prompt``, ``completion``                  the completion (prompt + completion, no
                                                          separator added: put one in your data)
text          ``text``                                    all of it
============  ==========================================  ==========================================

Checking a row (``check_fields``) normalizes it: a sharegpt row gets the ``messages`` its turns become,
so everything after this module sees one conversation form. Empty assistant turns are left untrained
(see ``conversations.py``).

A row is rendered to :class:`Rendered`: consecutive ``(text, trained)`` segments whose concatenation is
the whole training text. ``tokenize.py`` turns that into token ids and labels.

Chat turns are located by rendering prefixes of the conversation: assistant turn ``i`` starts where
``messages[:i]`` rendered with the generation prompt ends, and ends where ``messages[:i + 1]`` rendered
stops agreeing with the whole conversation (normally: at its end, so the template's end-of-turn token
and what follows it in the turn, e.g. ``<|im_end|>\\n``, are trained). Templates whose renderings of a
prefix do not agree with the whole conversation (e.g. ones that rewrite earlier turns) fall back to the
template's ``{% generation %}`` markers through ``return_assistant_tokens_mask``; without those markers
such a row is an error rather than a silently wrong mask.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from nibbletune.data.conversations import chat_messages, is_empty_assistant_turn, sharegpt_messages
from nibbletune.data.records import BadRows, DataError, Record, read_records

FORMATS = ("text", "completion", "alpaca", "chat", "sharegpt")
CHAT_FORMATS = ("chat", "sharegpt")
"""Formats rendered through the tokenizer's chat template."""
FORMAT_COLUMNS = {
    "chat": ("messages",),
    "sharegpt": ("conversations",),
    "alpaca": ("instruction", "output"),
    "completion": ("prompt", "completion"),
    "text": ("text",),
}
"""Required columns per format, in detection order: the first format whose columns are all present wins."""

ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)

_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


@dataclass
class Rendered:
    """A row as text: ``segments`` are ``(text, trained)`` pieces that concatenate to the whole text.

    ``from_template`` is True for chat rows: the chat template already wrote BOS and turn markers, so the
    tokenizer's own special tokens are not added again.
    """

    segments: list[tuple[str, bool]]
    from_template: bool = False

    @property
    def text(self) -> str:
        return "".join(text for text, _ in self.segments)


def detect_format(columns: Iterable[str]) -> str:
    """The format of a row with these column names: ``chat``, ``sharegpt``, ``alpaca``, ``completion`` or ``text``."""
    present = set(columns)
    for name, required in FORMAT_COLUMNS.items():
        if all(column in present for column in required):
            return name
    raise DataError(
        f"cannot tell the format from columns {sorted(present)}; expected 'text', 'prompt'+'completion', "
        "'instruction'+'output' (+'input'), 'messages' or 'conversations'"
    )


def check_format_name(format: str) -> str:
    """``format`` if it is ``"auto"`` or a known format name; a :class:`DataError` listing them otherwise."""
    if format != "auto" and format not in FORMATS:
        raise DataError(f"unknown data format {format!r}; expected one of: auto, {', '.join(FORMATS)}")
    return format


def load_records(path: str | Path, format: str = "auto", bad_rows: BadRows | None = None) -> list[Record]:
    """Read the rows at ``path`` and check each against ``format`` (``"auto"``: detected from the first row).

    Returned records hold normalized fields (e.g. chat ``messages`` parsed from a CSV cell, or made from
    ShareGPT ``conversations``). A bad row raises :class:`DataError` naming its file and line or row, or
    with a skipping ``bad_rows`` is left out and counted there.
    """
    return load_checked_records(path, format, bad_rows)[1]


def load_checked_records(
    path: str | Path, format: str = "auto", bad_rows: BadRows | None = None
) -> tuple[str, list[Record]]:
    """The format (detected when ``"auto"``) and the rows at ``path`` checked against it: see :func:`load_records`."""
    check_format_name(format)
    bad_rows = bad_rows if bad_rows is not None else BadRows()
    records = read_records(path, bad_rows)
    if format == "auto":
        format = _detect_records_format(records, bad_rows, path)
    checked = []
    for record in records:
        try:
            checked.append(Record(check_fields(record.fields, format, record.source), record.source))
        except DataError as error:
            bad_rows.add(str(error))
    if not checked:
        raise _no_usable_rows(path, bad_rows)
    return format, checked


def _no_usable_rows(path: str | Path, bad_rows: BadRows) -> DataError:
    return DataError(f"{path}: no usable rows ({bad_rows.count} bad rows skipped; the first: "
                     f"{bad_rows.first_reasons[0]})")


def _detect_records_format(records: list[Record], bad_rows: BadRows, path: str | Path) -> str:
    """The format of the first row, or when skipping bad rows, of the first row whose columns tell one."""
    if not records:
        raise _no_usable_rows(path, bad_rows)
    candidates = records if bad_rows.on_bad_rows == "skip" else records[:1]
    for record in candidates:
        try:
            return detect_format(record.fields)
        except DataError:
            continue
    try:
        return detect_format(records[0].fields)
    except DataError as error:
        raise DataError(f"{records[0].source}: {error}") from None


def check_fields(fields: dict, format: str, source: str) -> dict:
    """``fields`` normalized for ``format``, or a :class:`DataError` naming ``source`` and the problem."""
    missing = [column for column in FORMAT_COLUMNS[format] if column not in fields]
    if missing:
        raise DataError(
            f"{source}: missing column {', '.join(repr(c) for c in missing)} for format {format!r} "
            f"(row has {sorted(fields)})"
        )
    fields = dict(fields)
    if format == "text":
        _require_text(fields, "text", source)
    elif format == "completion":
        _require_text(fields, "prompt", source, allow_empty=True)
        _require_text(fields, "completion", source)
    elif format == "alpaca":
        _require_text(fields, "instruction", source)
        _require_text(fields, "output", source)
        if fields.get("input") is None:
            fields["input"] = ""
        _require_text(fields, "input", source, allow_empty=True)
    elif format == "sharegpt":
        fields["messages"] = sharegpt_messages(fields["conversations"], source)
    else:
        fields["messages"] = chat_messages(fields["messages"], source)
    return fields


def _require_text(fields: dict, column: str, source: str, allow_empty: bool = False) -> None:
    value = fields[column]
    if not isinstance(value, str):
        raise DataError(f"{source}: column {column!r} must be a string, got {_describe(value)}")
    if not allow_empty and not value.strip():
        raise DataError(f"{source}: column {column!r} is empty")


def _describe(value: object) -> str:
    return "nothing" if value is None else type(value).__name__


def render(fields: dict, format: str, tokenizer, source: str) -> Rendered:
    """The training text of one checked row, split into trained and untrained segments."""
    if format == "text":
        return Rendered([(fields["text"], True)])
    if format == "completion":
        return Rendered([(fields["prompt"], False), (fields["completion"], True)])
    if format == "alpaca":
        template = ALPACA_PROMPT if fields["input"].strip() else ALPACA_PROMPT_NO_INPUT
        prompt = template.format(instruction=fields["instruction"], input=fields["input"])
        return Rendered([(prompt, False), (fields["output"], True)])
    return render_chat(fields["messages"], tokenizer, source)


def require_chat_template(tokenizer, format: str = "chat") -> None:
    """A :class:`DataError` unless ``tokenizer`` has a chat template to render ``messages`` with."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            f"format {format!r} needs the tokenizer's chat template, but tokenizer.chat_template is not set; "
            "use a tokenizer that has one (an instruct model's), set it, or convert the data to "
            "prompt/completion"
        )


def has_generation_markers(tokenizer) -> bool:
    """Whether the chat template marks assistant text with ``{% generation %}``."""
    template = getattr(tokenizer, "chat_template", None) or ""
    templates = template.values() if isinstance(template, dict) else [template]
    return any(_GENERATION_TAG.search(text) for text in templates)


def render_chat(messages: list[dict], tokenizer, source: str) -> Rendered:
    """Render a conversation with the chat template, marking each non-empty assistant turn as trained."""
    require_chat_template(tokenizer)
    full = _apply_template(tokenizer, messages, source)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant" or is_empty_assistant_turn(message):
            continue
        span = _assistant_span(tokenizer, messages, index, full, source)
        if span is None:
            if has_generation_markers(tokenizer):
                return _render_with_generation_markers(tokenizer, messages, full, source)
            raise DataError(
                f"{source}: the chat template renders the conversation up to assistant turn {index} "
                "differently from the whole conversation, so the turn cannot be located; add "
                "{% generation %} markers to the template or use a template that renders turns in order"
            )
        spans.append(span)
    return Rendered(_segments(full, spans), from_template=True)


def _apply_template(tokenizer, messages: list[dict], source: str, generation_prompt: bool = False) -> str:
    try:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )
    except Exception as error:  # jinja raises its own types, and templates call raise_exception(...)
        raise DataError(f"{source}: the chat template failed on this conversation ({error})") from None


def _assistant_span(tokenizer, messages, index, full, source) -> tuple[int, int] | None:
    """Characters of ``full`` that assistant turn ``index`` owns, or None when prefixes disagree with it."""
    try:
        before = tokenizer.apply_chat_template(messages[:index], tokenize=False, add_generation_prompt=True)
    except Exception:  # some templates refuse an empty conversation or a generation prompt
        before = _apply_template(tokenizer, messages[:index], source) if index else ""
    if not full.startswith(before):
        before = _apply_template(tokenizer, messages[:index], source) if index else ""
        if not full.startswith(before):
            return None
    through = _apply_template(tokenizer, messages[: index + 1], source)
    # The turn ends where rendering it as the last message stops agreeing with the whole conversation:
    # normally the end of `through`; earlier for templates that close the final turn differently.
    end = len(through) if full.startswith(through) else _agreeing_prefix_length(tokenizer, through, full)
    content = messages[index].get("content")
    if end <= len(before) or (isinstance(content, str) and content.strip() not in full[len(before) : end]):
        return None
    return len(before), end


def _agreeing_prefix_length(tokenizer, through: str, full: str) -> int:
    """Characters of ``full`` covered by the tokens it shares with ``through`` from the start.

    Compared by tokens, not characters, so that ``</s>`` vs ``<|im_end|>`` does not count a shared ``<``.
    """
    length = 0
    for char_a, char_b in zip(through, full):
        if char_a != char_b:
            break
        length += 1
    if not getattr(tokenizer, "is_fast", False):
        return length
    ours = tokenizer(through, add_special_tokens=False)["input_ids"]
    theirs = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    shared = 0
    for a, b in zip(ours, theirs["input_ids"]):
        if a != b:
            break
        shared += 1
    return min(length, theirs["offset_mapping"][shared - 1][1]) if shared else 0


def _render_with_generation_markers(tokenizer, messages, full, source) -> Rendered:
    try:
        encoded = tokenizer.apply_chat_template(
            messages,
            tokenize=True,
            return_dict=True,
            return_assistant_tokens_mask=True,
            tokenizer_kwargs={"return_offsets_mapping": True},
        )
    except Exception as error:
        raise DataError(f"{source}: the chat template failed on this conversation ({error})") from None
    spans = _merge([
        (start, end)
        for (start, end), trained in zip(encoded["offset_mapping"], encoded["assistant_masks"])
        if trained and end > start
    ])
    if any(is_empty_assistant_turn(message) for message in messages):
        spans = _without_empty_turns(tokenizer, full, spans)
    return Rendered(_segments(full, spans), from_template=True)


def _without_empty_turns(tokenizer, full: str, spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """``spans`` less the turns that hold nothing but special tokens (e.g. only ``<|im_end|>``).

    The markers' mask does not say which turn a span belongs to; spans with only whitespace between them
    are taken as one turn.
    """
    specials = {token.content for token in tokenizer.added_tokens_decoder.values() if token.special}
    specials |= set(tokenizer.all_special_tokens)
    turns: list[list[tuple[int, int]]] = []
    for start, end in spans:
        if turns and not full[turns[-1][-1][1] : start].strip():
            turns[-1].append((start, end))
        else:
            turns.append([(start, end)])
    kept = []
    for turn in turns:
        text = full[turn[0][0] : turn[-1][1]]
        for special in specials:
            text = text.replace(special, "")
        if text.strip():
            kept += turn
    return kept


def _merge(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
        else:
            merged.append((start, end))
    return merged


def _segments(text: str, trained_spans: list[tuple[int, int]]) -> list[tuple[str, bool]]:
    segments = []
    position = 0
    for start, end in trained_spans:
        if start > position:
            segments.append((text[position:start], False))
        segments.append((text[start:end], True))
        position = end
    if position < len(text):
        segments.append((text[position:], False))
    return segments
