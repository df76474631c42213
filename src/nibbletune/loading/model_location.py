"""Where a model lives: a local transformers directory, or a Hugging Face Hub id fetched into the HF cache.

`resolve_model_dir("meta-llama/Llama-3.1-8B-Instruct")` downloads only what loading needs
(config, tokenizer files, safetensors weights; never pickled `.bin` files) with
`huggingface_hub.snapshot_download`, which reuses the HF cache and honours `HF_HUB_OFFLINE=1`
and `HF_TOKEN`. A path that exists locally is used as it is and nothing is fetched.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import FormatError

HUB_FILE_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.tiktoken", "*.txt", "*.jinja"]
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def looks_like_hub_id(name: str) -> bool:
    """True for "owner/name" strings that could be a Hub repository (not an absolute or dotted path)."""
    return bool(_REPO_ID.match(name)) and ".." not in name


def resolve_model_dir(name_or_path: str | os.PathLike) -> Path:
    """The local directory of a model: `name_or_path` itself when it exists, else its Hub snapshot.

    Raises FormatError with one line when the path does not exist and is not a Hub id, or when
    fetching from the Hub fails (offline and not cached, unknown or gated repository, network).
    """
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    name = str(name_or_path)
    if not looks_like_hub_id(name):
        raise FormatError(f"{name}: not a directory (nothing exists at that path)")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id=name, allow_patterns=HUB_FILE_PATTERNS))
    except Exception as exc:  # noqa: BLE001 - every hub failure becomes the same one-line error
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FormatError(f"{name}: not a local directory, and fetching it from the Hugging Face Hub failed "
                          f"({type(exc).__name__}: {detail})") from None


def resolve_config_dir(name_or_path: str | os.PathLike) -> Path:
    """Where a model's config is: `name_or_path` itself when it exists locally (a directory or a GGUF file),
    else the HF cache folder holding only the Hub repository's config.json (nothing else is fetched).

    FormatError with one line when it is neither, or when the Hub is offline and config.json not cached.
    """
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    name = str(name_or_path)
    if not looks_like_hub_id(name):
        raise FormatError(f"{name}: no such model directory or GGUF file, and not a Hugging Face Hub id")
    import logging

    hub_log = logging.getLogger("huggingface_hub")
    level = hub_log.level
    hub_log.setLevel(logging.ERROR)  # its retry warnings would bury the one-line error
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(repo_id=name, filename="config.json")).parent
    except Exception as exc:  # noqa: BLE001 - every hub failure becomes the same one-line error
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        if offline or "offline" in type(exc).__name__.lower() or "connect" in str(exc).lower():
            raise FormatError(f"{name}: config.json is not in the Hugging Face cache and the Hub cannot be reached "
                              "(offline); download it once online, or give a local model directory") from None
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FormatError(f"{name}: cannot fetch config.json from the Hugging Face Hub "
                          f"({type(exc).__name__}: {detail})") from None
    finally:
        hub_log.setLevel(level)


def gguf_file(location: Path) -> Path | None:
    """The GGUF file a model location stands for: the location itself when it is a `.gguf` file, or the
    one `.gguf` file of a directory that holds no config.json; None for a transformers directory.

    FormatError when a directory without config.json holds several GGUF files (which one is meant?).
    """
    location = Path(location)
    if location.is_file():
        return location if location.suffix == ".gguf" else None
    if not location.is_dir() or (location / "config.json").is_file():
        return None
    found = sorted(location.glob("*.gguf"))
    if len(found) > 1:
        raise FormatError(f"{location}: holds {len(found)} GGUF files ({', '.join(p.name for p in found[:3])}); "
                          "name the one to use as the model path")
    return found[0] if found else None
