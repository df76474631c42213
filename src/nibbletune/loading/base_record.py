"""Which base quantization an adapter was trained on, looked up from what sits beside it.

In order: the adapter's `nibbletune.json` (written by `save_adapter`), the training run's
`config.yaml` (its `quant` section) in the same directory, a checkpoint's `trainer_state.json`
(`config.quant`), else the defaults (nf4, blocksize 64, double quant), said so in `describe()`.
`merge`, `generate` and `eval` all use it, so they rebuild the same base.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import FormatError, NibbletuneError
from ..quant import QuantSettings
from .adapter_files import SIDECAR_NAME, read_sidecar

DEFAULTS_SOURCE = "defaults"


@dataclass(frozen=True)
class BaseQuantRecord:
    """The quantization an adapter trained on (`settings` None: a base without 4-bit linears) and where it was found."""

    settings: QuantSettings | None
    source: str

    @property
    def from_defaults(self) -> bool:
        """True when nothing beside the adapter recorded it."""
        return self.source == DEFAULTS_SOURCE

    def describe(self) -> str:
        """One line saying which base quantization is used and where it came from."""
        if self.settings is None:
            return f"training ran on a base without 4-bit linears (from {self.source})"
        text = f"training quantization: {self.settings.describe()}"
        if self.from_defaults:
            return (text + " (note: the adapter records no quantization settings - no nibbletune.json or training "
                    "config.yaml beside it - so these are the defaults; pass --quant-type/--blocksize/--no-double-quant "
                    "if training used others)")
        return text + f" (from {self.source})"


def recorded_base_quantization(adapter_dir: str | os.PathLike) -> BaseQuantRecord:
    """The base quantization recorded beside an adapter (module docstring for the order)."""
    root = Path(adapter_dir)
    found, recorded = read_sidecar(root)
    if found:
        return BaseQuantRecord(recorded, str(root / SIDECAR_NAME))
    section, source = _training_quant_section(root)
    if section is None:
        return BaseQuantRecord(QuantSettings(), DEFAULTS_SOURCE)
    try:
        settings = QuantSettings(
            quant_type=section.get("type", section.get("quant_type", "nf4")),
            blocksize=int(section.get("blocksize", 64)),
            double_quant=bool(section.get("double_quant", True)),
            compute_dtype=section.get("compute_dtype") or "auto",
            skip_modules=tuple(section.get("skip_modules") or ()),
        )
    except (NibbletuneError, TypeError, ValueError) as exc:
        raise FormatError(f"{source}: 'quant' section: {exc}") from None
    return BaseQuantRecord(settings, source)


def _training_quant_section(root: Path) -> tuple[dict | None, str]:
    """The `quant` section of the training config saved with an adapter, if any."""
    import yaml

    config_yaml, state_json = root / "config.yaml", root / "trainer_state.json"
    try:
        if config_yaml.is_file():
            quant = (yaml.safe_load(config_yaml.read_text()) or {}).get("quant")
            if isinstance(quant, dict):
                return quant, str(config_yaml)
        if state_json.is_file():
            quant = (json.loads(state_json.read_text()).get("config") or {}).get("quant")
            if isinstance(quant, dict):
                return quant, str(state_json)
    except (OSError, ValueError, AttributeError, yaml.YAMLError) as exc:
        raise FormatError(f"{root}: cannot read the training config recorded with the adapter ({exc})") from None
    return None, ""


def recorded_compute_dtype(adapter_dir: str | os.PathLike) -> str | None:
    """`quant.compute_dtype` of the training config saved beside the adapter (None without one): the
    compute dtype of a run whose base had no 4-bit linears, which `nibbletune.json` does not record."""
    section, _ = _training_quant_section(Path(adapter_dir))
    value = (section or {}).get("compute_dtype")
    return value if isinstance(value, str) else None
