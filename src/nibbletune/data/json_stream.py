"""Reading the rows of a ``.json`` file one at a time: a top-level list, or the list under ``"data"``.

``json.load`` reads the whole file, then parses it, and a file cut short gives one error and no rows.
Here the list's elements are decoded one by one with ``json.JSONDecoder.raw_decode`` from a buffer that
holds only the part not yet decoded, read in chunks of :data:`CHUNK_BYTES`. So memory is a chunk plus the
largest element (never a second copy of the file), and every element before a problem has been decoded
by the time the problem is found: a file truncated inside an element still gives every complete element
before the cut. Positions are reported as byte offsets into the file (and lines), found by counting the
bytes of the text each chunk boundary leaves behind.

Telling a buffer that ends inside an element from a corrupt element: raw_decode fails on both. A cut puts
the error at (or a few characters before) the end of the text, or reports an unterminated string (a
string can only be unterminated where the text ends); so such an error reads another chunk and tries
again, and only at the end of the file is the element *truncated*. An error anywhere else is corruption.
To read on after a corrupt element, its end is found by counting brackets outside strings (the first
``,`` or ``]`` at the element's own depth): that works unless the corruption itself unbalanced the
brackets or quotes, in which case nothing after it can be told apart and reading stops there.

This module knows nothing about rows or formats; ``records.py`` turns what it yields into rows.
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

CHUNK_BYTES = 1 << 20
"""Bytes read at a time (more when one element is larger, so re-decoding it stays linear)."""

_WHITESPACE = re.compile(r"[ \t\n\r]*")
_DECODER = json.JSONDecoder()
_CUT_SLACK = 16
"""Characters before the end of the buffer within which an error may come from a cut token (``\\u12``)."""
_PARTIAL_TOKEN = re.compile(r"[-+.0-9eE]*|[truefalsnNIiy]*|\\?u[0-9a-fA-F]{0,3}|\\")
"""Text that can be the start of a cut literal, number or escape: what may follow an error at the end."""
_STRING_OR_DELIMITER = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{},"]')
"""A whole string (skipped as one piece), a bracket, a comma, or a lone quote (a string the buffer cuts)."""


class JsonLayoutError(ValueError):
    """The file is not a JSON list (or ``{"data": [...]}``), or not UTF-8: nothing (more) can be read from it."""


@dataclass
class JsonElement:
    """One element of the list: its value, or what kept it from being read (``problem``)."""

    number: int
    """1-based position in the list."""
    byte_offset: int
    """Where the element starts in the file."""
    line: int
    """The 1-based line it starts on."""
    value: object = None
    problem: str | None = None
    """Why the element could not be decoded, naming the byte offset and line of the error; None when read."""
    truncated: bool = False
    """The file ends inside this element; it is the last one."""
    stops: bool = False
    """Nothing after this element can be read (it is truncated, or its end cannot be found)."""


class _Text:
    """The undecoded rest of a UTF-8 file, read chunk by chunk, with the byte offset and line of positions."""

    def __init__(self, handle: BinaryIO) -> None:
        self.handle = handle
        self.decoder = codecs.getincrementaldecoder("utf-8")()
        self.text = ""
        self.pos = 0
        """Index into ``text`` of the next character to decode."""
        self.bytes_read = 0
        self.at_end = False
        # A position whose byte offset and line are known, so that finding another one encodes only the
        # text between the two.
        self.cursor, self.cursor_bytes, self.cursor_line = 0, 0, 1

    def more(self) -> bool:
        """Drop the decoded text before ``pos`` and read another chunk; False at the end of the file."""
        if self.at_end:
            return False
        self.locate(self.pos)
        self.text, self.cursor, self.pos = self.text[self.pos :], self.cursor - self.pos, 0
        chunk = self.handle.read(max(CHUNK_BYTES, len(self.text), len(codecs.BOM_UTF8)))
        self.at_end = not chunk
        if self.bytes_read == 0 and chunk.startswith(codecs.BOM_UTF8):
            chunk = chunk[len(codecs.BOM_UTF8) :]
            self.bytes_read = self.cursor_bytes = len(codecs.BOM_UTF8)
        try:
            decoded = self.decoder.decode(chunk, final=self.at_end)
        except UnicodeDecodeError as error:
            if self.at_end:  # the file ends inside a multi-byte character: it was cut there
                decoded = ""
            else:
                raise JsonLayoutError(f"not UTF-8 text at byte {self.bytes_read + error.start}") from None
        self.bytes_read += len(chunk)
        self.text += decoded
        return True

    def locate(self, pos: int) -> tuple[int, int]:
        """The byte offset in the file and the 1-based line of ``text[pos]``."""
        if pos >= self.cursor:
            piece = self.text[self.cursor : pos]
            self.cursor_bytes += len(piece.encode("utf-8"))
            self.cursor_line += piece.count("\n")
            self.cursor = pos
            return self.cursor_bytes, self.cursor_line
        piece = self.text[pos : self.cursor]
        return self.cursor_bytes - len(piece.encode("utf-8")), self.cursor_line - piece.count("\n")

    def where(self, pos: int) -> str:
        """``byte N (line L)`` of ``text[pos]``."""
        byte_offset, line = self.locate(pos)
        return f"byte {byte_offset} (line {line})"

    def peek(self) -> str:
        """The next character after whitespace ('' at the end of the file); ``pos`` moves to it."""
        while True:
            self.pos = _WHITESPACE.match(self.text, self.pos).end()
            if self.pos < len(self.text) or not self.more():
                return self.text[self.pos : self.pos + 1]

    def expect(self, characters: str, after: str) -> str:
        """Consume the next character, one of ``characters``; a layout error naming where otherwise."""
        found = self.peek()
        if not found or found not in characters:
            shown = repr(found) if found else "the end of the file"
            expected = " or ".join(repr(c) for c in characters)
            raise JsonLayoutError(f"expected {expected} {after}, found {shown} at {self.where(self.pos)}")
        self.pos += 1
        return found

    def decode(self) -> object:
        """Decode the value at ``pos`` and move past it; :class:`_Truncated` or :class:`_Corrupt` if it can't."""
        while True:
            try:
                value, end = _DECODER.raw_decode(self.text, self.pos)
            except json.JSONDecodeError as error:
                if _may_be_cut(error, self.text, self.at_end) and self.more():
                    continue
                if _may_be_cut(error, self.text, self.at_end):
                    raise _Truncated() from None
                raise _Corrupt(f"invalid JSON at {self.where(error.pos)}: {error.msg}") from None
            if end == len(self.text) and self.text[end - 1].isdigit() and self.more():  # "12" may be "123"
                continue
            self.pos = end
            return value

    def skip_element(self) -> bool:
        """Move ``pos`` to the ``,`` or ``]`` that ends the element starting there; False if none is found."""
        depth, index = 0, self.pos
        while True:
            match = _STRING_OR_DELIMITER.search(self.text, index)
            if match is None or match.group() == '"':  # the buffer ends before the next piece does
                index -= self.pos
                if not self.more():
                    return False
                index += self.pos
                continue
            piece, index = match.group(), match.end()
            if piece in "[{":
                depth += 1
            elif piece in "]}" and depth:
                depth -= 1
            elif piece in ",]" and not depth:
                self.pos = match.start()
                return True
            elif piece == "}":
                return False


class _Truncated(Exception):
    pass


class _Corrupt(Exception):
    pass


def _may_be_cut(error: json.JSONDecodeError, text: str, at_end: bool) -> bool:
    """Whether the text ending where it does may explain ``error`` (exactly so at the end of the file)."""
    if error.msg.startswith("Unterminated string"):
        return True
    if not at_end:
        return error.pos >= len(text) - _CUT_SLACK
    return _PARTIAL_TOKEN.fullmatch(text[error.pos :].rstrip()) is not None


def iter_json_elements(handle: BinaryIO) -> Iterator[JsonElement]:
    """The elements of the JSON list in ``handle`` (a binary file), or of the list under its ``"data"`` key.

    A corrupt or truncated element is yielded with its ``problem``, and reading goes on after it where it
    can (``stops`` says when it can't). A file that is not such a list raises :class:`JsonLayoutError`.
    """
    text = _Text(handle)
    first = text.peek()
    if first and first in "[{":
        for element in _list_elements(text) if first == "[" else _elements_under_data_key(text):
            yield element
            if element.stops:
                return
    elif first:
        try:
            found = type(text.decode()).__name__
        except (_Truncated, _Corrupt):
            found = "invalid JSON"
        raise JsonLayoutError(f'expected a JSON list of objects or {{"data": [...]}}, got {found}')
    if text.peek():
        raise JsonLayoutError(f"unexpected text after the list at {text.where(text.pos)}")


def _list_elements(text: _Text) -> Iterator[JsonElement]:
    text.expect("[", "to open the list")
    if text.peek() == "]":
        text.pos += 1
        return
    number = 0
    while True:
        number += 1
        if not text.peek():
            after = f"after element {number - 1}" if number > 1 else "after its '['"
            problem = f"the file ends at byte {text.bytes_read}, {after}, before the list is closed"
            yield JsonElement(number, *text.locate(text.pos), problem=problem, truncated=True, stops=True)
            return
        element = JsonElement(number, *text.locate(text.pos))
        try:
            element.value = text.decode()
        except _Truncated:
            element.problem = (f"the file ends at byte {text.bytes_read} inside this element, which starts at "
                               f"byte {element.byte_offset} (line {element.line})")
            element.truncated = element.stops = True
        except _Corrupt as error:
            element.problem = str(error)
            element.stops = not text.skip_element()
        yield element
        if element.stops:
            return
        if text.peek() and text.expect(",]", f"after element {number} of the list") == "]":
            return


def _elements_under_data_key(text: _Text) -> Iterator[JsonElement]:
    text.expect("{", "to open the object")
    found_list = False
    while text.peek() != "}":
        key = _decode_member(text)
        text.expect(":", f"after key {key!r}")
        if key == "data" and text.peek() == "[":
            found_list = True
            for element in _list_elements(text):
                yield element
                if element.stops:
                    return
        else:
            _decode_member(text)
        if text.expect(",}", f"after the value of {key!r}") == "}":
            break
    else:
        text.pos += 1
    if not found_list:
        raise JsonLayoutError('expected a JSON list of objects or {"data": [...]}, got an object without a '
                              '"data" list')


def _decode_member(text: _Text) -> object:
    text.peek()
    where = text.where(text.pos)
    try:
        return text.decode()
    except _Truncated:
        raise JsonLayoutError(f"the file ends at byte {text.bytes_read}, inside the top-level object") from None
    except _Corrupt as error:
        raise JsonLayoutError(f"in the top-level object's value at {where}: {error}") from None
