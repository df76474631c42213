"""What an adapter says about its base beyond the quantization record: the base model it names."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..loading.adapter_files import CONFIG_NAME


def recorded_base_name(adapter_dir: str | os.PathLike) -> str | None:
    """`base_model_name_or_path` of the adapter's adapter_config.json (None when unset or unreadable)."""
    try:
        value = json.loads((Path(adapter_dir) / CONFIG_NAME).read_text()).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) and value else None
