"""Reading the small JSON files that sit beside weights (config.json, adapter_config.json)."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import FormatError


def read_json_file(root: Path, name: str, what: str) -> dict:
    """The JSON object in `root/name`; FormatError naming the directory or file otherwise.

    `what` says what `root` should be ("a transformers model directory"), for the messages when
    `root` is not a directory or lacks `name`.
    """
    file = root / name
    if not root.is_dir():
        raise FormatError(f"{root}: not a directory (expected {what})")
    if not file.is_file():
        raise FormatError(f"{root}: no {name} (expected {what})")
    try:
        value = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FormatError(f"{file}: invalid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise FormatError(f"{file}: expected a JSON object, got {type(value).__name__}")
    return value
