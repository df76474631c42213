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
