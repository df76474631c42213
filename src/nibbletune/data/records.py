"""Reading dataset files into rows, each remembering where it came from.

Supported files: ``.jsonl`` (one object per line), ``.json`` (a list of objects, or ``{"data": [...]}``),
``.csv`` (header row, every cell a string) and ``.parquet``. A directory stands for the supported files
directly inside it, a glob pattern for the files it matches; both are read in sorted order.

Each row becomes a :class:`Record` whose ``source`` names the file and position, so that any later
error can point at it:

- jsonl: ``data.jsonl:12``, the 1-based line number;
- csv: ``data.csv:12``, the 1-based line on which the row starts (the header is line 1);
- json and parquet: ``data.json: row 3``, the 1-based position in the list or table.

jsonl is parsed here line by line so the line numbers are exact. csv is read with the standard
library's ``csv`` module rather than pyarrow: it gives the line each row starts on, and it keeps every
cell a string (pyarrow would infer ``"42"`` as an integer column). parquet is read with pyarrow.

This module knows nothing about formats (which columns a row needs): see ``formats.py``.
"""

from __future__ import annotations

import csv
import glob
import json
from dataclasses import dataclass
from pathlib import Path

from nibbletune.errors import NibbletuneError

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


class DataError(NibbletuneError, ValueError):
    """A dataset file, row or setting the data stage cannot use; the message names the file and row."""


@dataclass
class Record:
    """One row of a dataset file: its columns, and where it came from (``file:line`` or ``file: row N``)."""

    fields: dict
    source: str


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


def read_records(path: str | Path) -> list[Record]:
    """All rows of the file(s) at ``path``; :class:`DataError` for an unreadable row or an empty file."""
    records: list[Record] = []
    for file in resolve_files(path):
        file_records = _READERS[file.suffix.lower()](file)
        if not file_records:
            raise DataError(f"{file}: file holds no rows")
        records.extend(file_records)
    return records


def _require_object(value: object, source: str) -> dict:
    if not isinstance(value, dict):
        raise DataError(f"{source}: expected a JSON object with named columns, got {type(value).__name__}")
    return value


def _read_jsonl(file: Path) -> list[Record]:
    records = []
    with open(file, encoding="utf-8-sig") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            source = f"{file}:{line_number}"
            try:
                value = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{source}: invalid JSON ({error.msg} at column {error.colno})") from None
            records.append(Record(_require_object(value, source), source))
    return records


def _read_json(file: Path) -> list[Record]:
    try:
        with open(file, encoding="utf-8-sig") as handle:
            value = json.load(handle)
    except json.JSONDecodeError as error:
        raise DataError(
            f"{file}:{error.lineno}: invalid JSON ({error.msg} at column {error.colno})"
        ) from None
    if isinstance(value, dict) and isinstance(value.get("data"), list):
        value = value["data"]
    if not isinstance(value, list):
        raise DataError(
            f'{file}: expected a JSON list of objects or {{"data": [...]}}, got {type(value).__name__}'
        )
    records = []
    for row_number, item in enumerate(value, start=1):
        source = f"{file}: row {row_number}"
        records.append(Record(_require_object(item, source), source))
    return records


def _read_csv(file: Path) -> list[Record]:
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
                    raise DataError(f"{source}: expected {len(header)} cells like the header, got {len(row)}")
                records.append(Record(dict(zip(header, row)), source))
        except csv.Error as error:
            raise DataError(f"{file}:{reader.line_num}: invalid CSV ({error})") from None
    return records


def _read_parquet(file: Path) -> list[Record]:
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
