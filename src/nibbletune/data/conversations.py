"""Conversations: chat ``messages`` and ShareGPT ``conversations`` checked into one form, and their turns counted.

Both conversation formats become OpenAI-style messages (``{"role": ..., "content": ...}``) that
``formats.py`` renders with the tokenizer's chat template:

- ``chat``: the ``messages`` column holds them already. Each needs a ``role`` string and a ``content``
  string (or ``content: null`` with ``tool_calls``); other keys are kept for the template.
- ``sharegpt``: the ``conversations`` column holds ``{"from": ..., "value": ...}`` turns (``{"role",
  "content"}`` is read too). ``from`` is mapped through :data:`SHAREGPT_ROLES`, ignoring case; another
  role is an error naming the turn, rather than a guess.

Either column may be JSON text instead of a list (a CSV cell can hold nothing else).

An assistant turn whose content is empty or whitespace is not trained: training it would teach the
model to answer with nothing but its end-of-turn token. The turn stays in the conversation, masked, so
the turns around it keep their order (templates that insist on user/assistant alternation still render
it). ``build_dataset`` drops a conversation that has no assistant turn left to train, and counts both
through :func:`count_turns`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from nibbletune.data.records import DataError

SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
    "system": "system",
}
"""ShareGPT ``from`` values (lower-cased) and the chat role each becomes."""


@dataclass(frozen=True)
class TurnCounts:
    """How many turns a conversation has, and how many of its assistant turns are empty."""

    turns: int
    assistant_turns: int
    empty_assistant_turns: int
    """Assistant turns with empty or whitespace-only content (and no tool calls): never trained."""

    @property
    def trained_assistant_turns(self) -> int:
        return self.assistant_turns - self.empty_assistant_turns


def chat_messages(messages: object, source: str) -> list[dict]:
    """The ``messages`` column of a chat row, checked; a :class:`DataError` naming ``source`` otherwise."""
    checked = []
    for where, message in _turns(messages, "messages", "{role, content}", source):
        # parquet gives every struct field to every message, as None where a message lacks it
        message = {key: value for key, value in message.items() if value is not None or key == "content"}
        if not isinstance(message.get("role"), str) or not message["role"]:
            raise DataError(f"{where}: 'role' must be a non-empty string, got {_describe(message.get('role'))}")
        content = message.get("content")
        if not isinstance(content, str) and not (content is None and message.get("tool_calls")):
            raise DataError(f"{where}: 'content' must be a string, got {_describe(content)}")
        checked.append(message)
    return checked


def sharegpt_messages(conversations: object, source: str) -> list[dict]:
    """The ``conversations`` column of a ShareGPT row as chat messages, roles mapped by :data:`SHAREGPT_ROLES`."""
    messages = []
    for where, turn in _turns(conversations, "conversations", "{from, value}", source):
        speaker = turn.get("from") if turn.get("from") is not None else turn.get("role")
        value = turn.get("value") if turn.get("value") is not None else turn.get("content")
        if not isinstance(speaker, str) or speaker.strip().lower() not in SHAREGPT_ROLES:
            shown = repr(speaker) if isinstance(speaker, str) else _describe(speaker)
            raise DataError(f"{where}: 'from' must be one of {', '.join(SHAREGPT_ROLES)}, got {shown}")
        if not isinstance(value, str):
            raise DataError(f"{where}: 'value' must be a string, got {_describe(value)}")
        messages.append({"role": SHAREGPT_ROLES[speaker.strip().lower()], "content": value})
    return messages


def _turns(value: object, column: str, shape: str, source: str):
    """(where, turn) for each turn of a conversation column, each checked to be an object of `shape`."""
    for index, turn in enumerate(_parse_list(value, column, f"{shape} objects", source)):
        where = f"{source}: {column}[{index}]"
        if not isinstance(turn, dict):
            raise DataError(f"{where} must be a {shape} object, got {_describe(turn)}")
        yield where, turn


def is_empty_assistant_turn(message: dict) -> bool:
    """Whether ``message`` is an assistant turn with nothing to train: no text (or only whitespace), no tool call."""
    content = message.get("content")
    return (
        message["role"] == "assistant"
        and not message.get("tool_calls")
        and (content is None or (isinstance(content, str) and not content.strip()))
    )


def count_turns(messages: list[dict]) -> TurnCounts:
    """The :class:`TurnCounts` of checked ``messages``."""
    assistant = [message for message in messages if message["role"] == "assistant"]
    empty = sum(is_empty_assistant_turn(message) for message in assistant)
    return TurnCounts(turns=len(messages), assistant_turns=len(assistant), empty_assistant_turns=empty)


def _parse_list(value: object, column: str, items: str, source: str) -> list:
    if isinstance(value, str):  # a CSV cell can only hold the list as JSON text
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise DataError(f"{source}: column {column!r} is a string that is not a JSON list") from None
    if not isinstance(value, list):
        raise DataError(f"{source}: column {column!r} must be a list of {items}, got {_describe(value)}")
    return value


def _describe(value: object) -> str:
    return "nothing" if value is None else type(value).__name__
