"""The one reader of adapter directories: PEFT files plus nibbletune's record of the base quantization.

An adapter directory holds

* `adapter_config.json`: PEFT's LoraConfig fields, read by `LoraSettings.from_peft`, which
  refuses what nibbletune cannot honour (rank/alpha patterns, modules_to_save, trained biases, ...);
* `adapter_model.safetensors`: for a LoraLinear at module path `<path>`,

      base_model.model.<path>.lora_A.weight           [r, in_features]
      base_model.model.<path>.lora_B.weight           [out_features, r]
      base_model.model.<path>.lora_magnitude_vector   [out_features]   (DoRA only)

  which is what `peft.PeftModel.save_pretrained` writes for the default adapter (keys with the
  adapter name, `.lora_A.default.weight`, are read too);
* `nibbletune.json` (ignored by PEFT): the QuantSettings of the base the adapter trained on,

      {"format": 2, "base_quantization": {"quant_type": "nf4", "blocksize": 64, "double_quant": true,
                                           "compute_dtype": "float32", "skip_modules": []}}

  with `base_quantization` null when training ran on a base without 4-bit linears. Format 1
  (the first release) had the same keys.

Everything that reads an adapter (`load_adapter` for generate and training resume, `merge`, the
GGUF adapter export, eval) goes through `read_adapter`, so they accept and refuse the same files;
`check_adapter_fits` is the one check that an adapter belongs to a base.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import FormatError, NibbletuneError
from ..modules.lora_settings import LoraSettings
from ..quant import QuantSettings
from .json_files import read_json_file
from .safetensors_io import open_checkpoint

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
SIDECAR_NAME = "nibbletune.json"
SIDECAR_FORMAT = 2
KEY_PREFIX = "base_model.model."
_KEY_SUFFIXES = (
    (".lora_A.weight", "lora_A"), (".lora_B.weight", "lora_B"),
    (".lora_A.default.weight", "lora_A"), (".lora_B.default.weight", "lora_B"),
    (".lora_magnitude_vector", "magnitude"), (".lora_magnitude_vector.weight", "magnitude"),
    (".lora_magnitude_vector.default.weight", "magnitude"),
)


@dataclass
class LoraTensors:
    """The adapter tensors of one target linear, as stored (dtype unchanged)."""

    lora_A: torch.Tensor
    lora_B: torch.Tensor
    magnitude: torch.Tensor | None = None

    def named(self) -> dict[str, torch.Tensor]:
        """The tensors under LoraLinear's parameter names (lora_A.weight, lora_B.weight, lora_magnitude_vector)."""
        named = {"lora_A.weight": self.lora_A, "lora_B.weight": self.lora_B}
        if self.magnitude is not None:
            named["lora_magnitude_vector"] = self.magnitude
        return named


@dataclass
class AdapterFiles:
    """An adapter directory read and checked: its settings and its tensors by module path."""

    path: Path
    settings: LoraSettings
    modules: dict[str, LoraTensors] = field(default_factory=dict)

    @property
    def scaling(self) -> float:
        """alpha / r, or alpha / sqrt(r) with rsLoRA (PEFT's rule)."""
        return self.settings.scaling


def read_adapter(path: str | os.PathLike) -> AdapterFiles:
    """Read and check an adapter directory; FormatError naming the file or key on any problem.

    Checked: the config (as `LoraSettings.from_peft`), the safetensors header (truncated files
    refused), every key a LoRA tensor, lora_A/lora_B pairs of rank r with fitting shapes, DoRA
    magnitudes present exactly when use_dora.
    """
    root = Path(path)
    config_file, weights_file = root / CONFIG_NAME, root / WEIGHTS_NAME
    raw = read_json_file(root, CONFIG_NAME, "a PEFT adapter directory")
    try:
        settings = LoraSettings.from_peft(raw, source=str(config_file))
    except FormatError:
        raise
    except NibbletuneError as exc:
        raise FormatError(str(exc)) from None
    if not weights_file.is_file():
        raise FormatError(f"{weights_file}: not found (a PEFT adapter directory holds {CONFIG_NAME} and {WEIGHTS_NAME})")
    parts: dict[str, dict[str, torch.Tensor]] = {}
    with open_checkpoint(weights_file) as checkpoint:
        for key in checkpoint.keys():
            module, kind = _split_key(key, weights_file)
            if kind in parts.setdefault(module, {}):
                raise FormatError(f"{weights_file}: two tensors for {module}.{kind}")
            parts[module][kind] = checkpoint.get(key)
    if not parts:
        raise FormatError(f"{weights_file}: holds no LoRA tensors")
    adapter = AdapterFiles(root, settings)
    for module, tensors in parts.items():
        for kind in ("lora_A", "lora_B"):
            if kind not in tensors:
                raise FormatError(f"{weights_file}: missing key '{KEY_PREFIX}{module}.{kind}.weight'")
        a, b, m = tensors["lora_A"], tensors["lora_B"], tensors.get("magnitude")
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise FormatError(f"{weights_file}: {module}: lora_A {list(a.shape)} and lora_B {list(b.shape)} do not fit")
        if a.shape[0] != settings.r:
            raise FormatError(f"{weights_file}: {module}.lora_A has rank {a.shape[0]}, {CONFIG_NAME} says r={settings.r}")
        if settings.use_dora and m is None:
            raise FormatError(f"{weights_file}: missing key '{KEY_PREFIX}{module}.lora_magnitude_vector' (DoRA)")
        if m is not None and not settings.use_dora:
            raise FormatError(f"{weights_file}: {module} has a DoRA magnitude but {CONFIG_NAME} says use_dora false")
        if m is not None and m.shape != (b.shape[0],):
            raise FormatError(f"{weights_file}: {module}.lora_magnitude_vector has shape {list(m.shape)}, "
                              f"expected [{b.shape[0]}]")
        adapter.modules[module] = LoraTensors(a, b, m)
    return adapter


def _split_key(key: str, file: Path) -> tuple[str, str]:
    """'base_model.model.x.y.lora_A.weight' -> ('x.y', 'lora_A')."""
    name = key.removeprefix(KEY_PREFIX)
    for suffix, kind in _KEY_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)], kind
    raise FormatError(f"{file}: tensor '{key}' is not a LoRA tensor (trained embeddings / modules_to_save "
                      "are not supported)")


def write_sidecar(directory: Path, quant: QuantSettings | None) -> None:
    """Write `nibbletune.json` recording the base quantization (None: no 4-bit linears)."""
    record = {"format": SIDECAR_FORMAT, "base_quantization": None if quant is None else quant.to_record()}
    (Path(directory) / SIDECAR_NAME).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")


def read_sidecar(adapter_dir: str | os.PathLike) -> tuple[bool, QuantSettings | None]:
    """(found, settings) from an adapter's `nibbletune.json`; (False, None) when there is none.

    `settings` is None when the adapter trained on a base without 4-bit linears. FormatError for
    an unreadable or malformed record.
    """
    path = Path(adapter_dir) / SIDECAR_NAME
    if not path.is_file():
        return False, None
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FormatError(f"{path}: cannot read ({exc})") from None
    if not isinstance(record, dict) or "base_quantization" not in record:
        raise FormatError(f"{path}: expected a JSON object with 'base_quantization'")
    if record.get("format", 1) not in (1, SIDECAR_FORMAT):
        raise FormatError(f"{path}: format {record.get('format')!r} is newer than this nibbletune understands")
    if record["base_quantization"] is None:
        return True, None
    try:
        return True, QuantSettings.from_record(record["base_quantization"], source=f"{path}: 'base_quantization'")
    except NibbletuneError as exc:
        raise FormatError(str(exc)) from None


class AdapterMismatchError(NibbletuneError, ValueError):
    """An adapter that does not fit the base model (other architecture or sizes)."""


def check_adapter_fits(adapter: AdapterFiles, shapes: dict[str, tuple[int, int]], base: str | os.PathLike) -> None:
    """Every adapter target must be a linear of the base with matching (out, in) sizes."""
    for module, pair in adapter.modules.items():
        if module not in shapes:
            raise AdapterMismatchError(
                f"{adapter.path}: adapter targets '{module}', which is not a linear layer of {base} "
                "(adapter trained for another base model?)"
            )
        out_features, in_features = shapes[module]
        if pair.lora_A.shape[1] != in_features or pair.lora_B.shape[0] != out_features:
            raise AdapterMismatchError(
                f"{adapter.path}: '{module}' expects a {pair.lora_B.shape[0]}x{pair.lora_A.shape[1]} weight but "
                f"{base} has {out_features}x{in_features} (adapter trained for another base model?)"
            )


def linear_shapes(model) -> dict[str, tuple[int, int]]:
    """(out, in) of every linear layer of `model` (a loaded model or a skeleton), by path: what
    `check_adapter_fits` compares an adapter with."""
    from ..modules.linear_layers import linear_features, linear_layers

    return {path: linear_features(module) for path, module in linear_layers(model).items()}
