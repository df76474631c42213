"""The config and tokenizer of a GGUF file, built from its metadata by transformers' own GGUF support.

Building them parses the file's whole metadata in Python (12 s each for Gemma 3's 262k-token
vocabulary on the machines here), and one command needs them several times (train: config,
tokenizer, model; merge: the same again for verification), so each is built once per file
version (path, size, mtime) in a process, and callers get their own copy.
"""

from __future__ import annotations

import copy
from functools import lru_cache
from pathlib import Path

from ..errors import FormatError


def import_gguf():
    """The `gguf` package (FormatError naming what to install when it is missing)."""
    try:
        import gguf
    except ImportError:
        raise FormatError("reading a GGUF model needs the `gguf` package: pip install gguf") from None
    return gguf


def file_version(path: Path) -> tuple[str, int, int]:
    """(resolved path, size, mtime): a cache key that changes when the file does."""
    stat = Path(path).stat()
    return str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns


def gguf_config(path: Path):
    """The transformers config of a GGUF file, from its metadata (transformers' own mapping); a fresh copy."""
    return copy.deepcopy(_config(file_version(path)))


def gguf_tokenizer(path: Path):
    """The tokenizer stored in a GGUF file's metadata, built by transformers; a fresh copy."""
    return copy.deepcopy(_tokenizer(file_version(path)))


@lru_cache(maxsize=4)
def _config(version: tuple[str, int, int]):
    from transformers import AutoConfig

    path = Path(version[0])
    import_gguf()
    try:
        config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    except (ValueError, OSError, KeyError, TypeError, NotImplementedError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FormatError(f"{path}: cannot read the model config from the GGUF metadata ({first_line})") from None
    return config


@lru_cache(maxsize=4)
def _tokenizer(version: tuple[str, int, int]):
    from transformers import AutoTokenizer

    path = Path(version[0])
    import_gguf()
    try:
        return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except (ValueError, OSError, KeyError, TypeError, NotImplementedError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FormatError(f"{path}: cannot build the tokenizer from the GGUF metadata ({first_line})") from None
