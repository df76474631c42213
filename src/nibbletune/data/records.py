"""Reading dataset files into rows, each remembering where it came from.

Supported files: ``.jsonl`` (one object per line), ``.json`` (a list of objects, or ``{"data": [...]}``),
``.csv`` (header row, every cell a string) and ``.parquet``. A directory stands for the supported files
directly inside it, a glob pattern for the files it matches; both are read in sorted order.

Each row becomes a :class:`Record` whose ``source`` names the file and position, so that any later
error can point at it:

- jsonl: ``data.jsonl:12``, the 1-based line number;
- csv: ``data.csv:12``, the 1-based line on which the row starts (the header is line 1);
- json and parquet: ``data.json: row 3``, the 1-based position in the list or table.

jsonl is parsed here line by line (as bytes, so lines end only at newline bytes and the numbers are exact).
json is streamed element by element (``json_stream.py``): a file cut short still gives the rows before
the cut, and problems are located by byte offset. csv is read with the standard library's ``csv`` module
rather than pyarrow: it gives the line each row starts on, and it keeps every cell a string (pyarrow
would infer ``"42"`` as an integer column). parquet is read with pyarrow.

A row that cannot be read (invalid or truncated JSON, not an object, the wrong number of cells) goes to
:class:`BadRows`: with ``on_bad_rows="error"`` (the default) it raises a :class:`DataError`; with
``"skip"`` it is left out, counted, and the first few reasons are kept for the dataset's warnings. A
file that is not a dataset at all (not UTF-8, not a JSON list, broken CSV quoting) is an error either way.

This module knows nothing about formats (which columns a row needs): see ``formats.py``.
"""

from __future__ import annotations

import codecs
import csv
import glob
import json
from dataclasses import dataclass, field
from pathlib import Path

from nibbletune.data.json_stream import JsonLayoutError, iter_json_elements
from nibbletune.errors import NibbletuneError

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
ON_BAD_ROWS = ("error", "skip")
KEPT_REASONS = 5
"""How many reasons :class:`BadRows` keeps (it counts them all)."""


class DataError(NibbletuneError, ValueError):
    """A dataset file, row or setting the data stage cannot use; the message names the file and row."""


@dataclass
class Record:
    """One row of a dataset file: its columns, and where it came from (``file:line`` or ``file: row N``)."""

    fields: dict
    source: str


@dataclass
class BadRows:
    """What happens to a row that cannot be read or used: raised (``error``) or left out and counted (``skip``)."""

    on_bad_rows: str = "error"
    count: int = 0
    """Rows left out (``skip`` only)."""
    first_reasons: list[str] = field(default_factory=list)
    """The first :data:`KEPT_REASONS` of them, each naming its file and line, row or byte offset."""

    def __post_init__(self) -> None:
        if self.on_bad_rows not in ON_BAD_ROWS:
            raise DataError(f"on_bad_rows must be one of {', '.join(ON_BAD_ROWS)}, got {self.on_bad_rows!r}")

    def add(self, reason: str) -> None:
        """Raise ``reason`` (one line naming the row) as a :class:`DataError`, or count it when skipping."""
        if self.on_bad_rows == "error":
            raise DataError(reason)
        self.count += 1
        if len(self.first_reasons) < KEPT_REASONS:
            self.first_reasons.append(reason)


def resolve_files(path: str | Path) -> list[Path]:
    """The dataset files that ``path`` (a file, a directory or a glob pattern) stands for, sorted."""
    path_text = str(path)
    candidate = Path(path_text)
    if candidate.is_dir():
        files = sorted(p for p in candidate.iterdir() if p.is_file() and p.suffix.lower() in SUFFIXES)
        if not files:
            raise DataError(f"{candidate}: directory holds no dataset files (expected {', '.join(SUFFIXES)})")
        return files
    if candidate.is_file():
        if candidate.suffix.lower() not in SUFFIXES:
            raise DataError(
                f"{candidate}: unsupported file type {candidate.suffix!r}; expected {', '.join(SUFFIXES)}"
            )
        return [candidate]
    if glob.has_magic(path_text):
        matches = sorted(Path(p) for p in glob.glob(path_text, recursive=True))
        files = [p for p in matches if p.is_file() and p.suffix.lower() in SUFFIXES]
        if not files:
            raise DataError(f"{path_text}: pattern matches no dataset files (expected {', '.join(SUFFIXES)})")
        return files
    raise DataError(f"{path_text}: no such file or directory")


def read_records(path: str | Path, bad_rows: BadRows | None = None) -> list[Record]:
    """All rows of the file(s) at ``path``; unreadable rows go to ``bad_rows`` (default: raise them).

    An empty file, or one that is not a dataset at all, raises :class:`DataError` whatever ``bad_rows`` says.
    """
    bad_rows = bad_rows if bad_rows is not None else BadRows()
    records: list[Record] = []
    for file in resolve_files(path):
        bad_before = bad_rows.count
        file_records = _READERS[file.suffix.lower()](file, bad_rows)
        if not file_records and bad_rows.count == bad_before:
            raise DataError(f"{file}: file holds no rows")
        records.extend(file_records)
    return records


def _is_object(value: object, source: str, bad_rows: BadRows) -> bool:
    if isinstance(value, dict):
        return True
    bad_rows.add(f"{source}: expected a JSON object with named columns, got {type(value).__name__}")
    return False


def _read_jsonl(file: Path, bad_rows: BadRows) -> list[Record]:
    records = []
    with open(file, "rb") as handle:
        for line_number, raw_line in enumerate(handle, start=1):
            source = f"{file}:{line_number}"
            if line_number == 1:
                raw_line = raw_line.removeprefix(codecs.BOM_UTF8)
            try:
                line = raw_line.decode("utf-8")
            except UnicodeDecodeError as error:
                bad_rows.add(f"{source}: not UTF-8 text (at column {error.start + 1})")
                continue
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as error:
                cut = not line.endswith("\n") and (
                    error.msg.startswith("Unterminated string") or error.pos >= len(line.rstrip())
                )
                hint = "; the file ends inside this line: truncated?" if cut else ""
                at = "" if error.msg.endswith(" at") else " at"  # "Unterminated string starting at"
                bad_rows.add(f"{source}: invalid JSON ({error.msg}{at} column {error.colno}){hint}")
                continue
            if _is_object(value, source, bad_rows):
                records.append(Record(value, source))
    return records


def _read_json(file: Path, bad_rows: BadRows) -> list[Record]:
    records = []
    with open(file, "rb") as handle:
        try:
            for element in iter_json_elements(handle):
                source = f"{file}: row {element.number}"
                if element.problem is None:
                    if _is_object(element.value, source, bad_rows):
                        records.append(Record(element.value, source))
                    continue
                if element.truncated:
                    kept = "are kept" if bad_rows.on_bad_rows == "skip" else "can be kept with on_bad_rows: skip"
                    bad_rows.add(f"{source}: {element.problem}: truncated file? (the {len(records)} complete rows "
                                 f"before it {kept})")
                elif element.stops:
                    bad_rows.add(f"{source}: {element.problem}; where the row ends cannot be found, so the rest "
                                 "of the file is not read")
                else:
                    bad_rows.add(f"{source}: {element.problem}")
        except JsonLayoutError as error:
            raise DataError(f"{file}: {error}") from None
    return records


def _read_csv(file: Path, bad_rows: BadRows) -> list[Record]:
    records = []
    with open(file, encoding="utf-8-sig", newline="") as handle:
        reader = csv.reader(handle)
        try:
            header = next(reader, None)
            if header is None:
                return []
            start_line = reader.line_num + 1
            for row in reader:
                source = f"{file}:{start_line}"
                start_line = reader.line_num + 1
                if not row:  # an empty line
                    continue
                if len(row) != len(header):
                    bad_rows.add(f"{source}: expected {len(header)} cells like the header, got {len(row)}")
                    continue
                records.append(Record(dict(zip(header, row)), source))
        except csv.Error as error:
            raise DataError(f"{file}:{reader.line_num}: invalid CSV ({error})") from None
        except UnicodeDecodeError as error:
            raise DataError(f"{file}: not UTF-8 text (near line {reader.line_num + 1}: {error.reason})") from None
    return records


def _read_parquet(file: Path, bad_rows: BadRows) -> list[Record]:
    try:
        import pyarrow.parquet as pq
    except ImportError:  # pragma: no cover - pyarrow is in the `data` extra
        raise DataError(f"{file}: reading parquet needs pyarrow (pip install 'nibbletune[data]')") from None
    try:
        rows = pq.read_table(file).to_pylist()
    except Exception as error:  # pyarrow raises several types for a damaged file
        raise DataError(f"{file}: cannot read parquet ({error})") from None
    return [Record(row, f"{file}: row {row_number}") for row_number, row in enumerate(rows, start=1)]


_READERS = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}
