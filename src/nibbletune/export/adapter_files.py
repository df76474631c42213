"""Reading a PEFT LoRA adapter directory as plain tensors, and checking it against a base model.

An adapter is `adapter_config.json` + `adapter_model.safetensors` with keys
`base_model.model.<module path>.lora_A.weight` (r x in), `.lora_B.weight` (out x r) and, for
DoRA, `.lora_magnitude_vector` (out). Everything here is a pure function over those files; no
model is built.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import FormatError, NibbletuneError
from ..loading.json_files import read_json_file
from ..loading.peft_adapter import CONFIG_NAME as ADAPTER_CONFIG
from ..loading.peft_adapter import KEY_PREFIX as PEFT_PREFIX
from ..loading.peft_adapter import SIDECAR_NAME, read_base_quantization
from ..loading.peft_adapter import WEIGHTS_NAME as ADAPTER_WEIGHTS
from ..loading.safetensors_io import open_checkpoint
from ..modules.lora import lora_scaling


class AdapterMismatchError(NibbletuneError, ValueError):
    """An adapter that does not fit the base model (other architecture or sizes)."""


@dataclass
class LoraPair:
    """The adapter tensors of one target linear."""

    lora_A: torch.Tensor
    lora_B: torch.Tensor
    magnitude: torch.Tensor | None = None


@dataclass
class Adapter:
    """A PEFT adapter read from disk: settings and per-module tensors (module path -> LoraPair)."""

    path: Path
    config: dict
    r: int
    alpha: float
    use_rslora: bool
    use_dora: bool
    modules: dict[str, LoraPair] = field(default_factory=dict)

    @property
    def scaling(self) -> float:
        """alpha / r, or alpha / sqrt(r) with rsLoRA (PEFT's rule)."""
        return lora_scaling(self.r, self.alpha, self.use_rslora)

    def quant_settings(self) -> dict:
        """The base quantization the adapter was trained with (see `training_quant_settings`)."""
        return training_quant_settings(self.path)


DEFAULT_QUANT = {"quant_type": "nf4", "double_quant": True, "blocksize": 64, "compute_dtype": None,
                 "skip_modules": [], "quantized": True}


def training_quant_settings(adapter_dir: str | os.PathLike) -> dict:
    """How the base was quantized while the adapter in `adapter_dir` trained.

    Looked up in order: `nibbletune.json` (written by `save_adapter`), the training run's
    `config.yaml` (section `quant`) beside the adapter, a checkpoint's `trainer_state.json`
    (`config.quant`), else defaults (nf4, blocksize 64, double quant). Keys: quant_type,
    double_quant, blocksize, compute_dtype (None: not recorded), skip_modules, quantized (False
    when training ran on a base with no 4-bit linears), source (the file, or "defaults").
    """
    root = Path(adapter_dir)
    settings = dict(DEFAULT_QUANT, source="defaults")
    found, recorded = read_base_quantization(root)
    if found:
        if recorded is None:
            return dict(settings, quantized=False, source=str(root / SIDECAR_NAME))
        return dict(settings, **recorded, source=str(root / SIDECAR_NAME))
    recorded, source = _training_quant_record(root)
    if recorded:
        compute_dtype = recorded.get("compute_dtype")
        settings.update(
            quant_type=recorded.get("type", recorded.get("quant_type", "nf4")),
            double_quant=bool(recorded.get("double_quant", True)),
            blocksize=int(recorded.get("blocksize", 64)),
            compute_dtype=None if compute_dtype in (None, "auto") else compute_dtype,
            skip_modules=list(recorded.get("skip_modules") or []),
            source=source,
        )
    return settings


def _training_quant_record(root: Path) -> tuple[dict | None, str]:
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


def describe_quant_settings(settings: dict) -> str:
    """One line saying which base quantization is used and where it came from."""
    if not settings.get("quantized", True):
        return f"training ran on a base without 4-bit linears (from {settings['source']})"
    text = (f"training quantization: {settings['quant_type']}, blocksize {settings['blocksize']}, "
            f"double quant {settings['double_quant']}")
    if settings["source"] == "defaults":
        return (text + " (note: the adapter records no quantization settings - no nibbletune.json or training "
                "config.yaml beside it - so these are the defaults; pass --quant-type/--blocksize/--no-double-quant "
                "if training used others)")
    return text + f" (from {settings['source']})"


def read_adapter(path: str | os.PathLike) -> Adapter:
    """Read and check an adapter directory; FormatError naming the file or key on any problem."""
    root = Path(path)
    config_file, weights_file = root / ADAPTER_CONFIG, root / ADAPTER_WEIGHTS
    config = read_json_file(root, ADAPTER_CONFIG, "a PEFT adapter directory")
    if not weights_file.is_file():
        raise FormatError(f"{root}: no {ADAPTER_WEIGHTS}")
    if config.get("peft_type", "LORA") != "LORA":
        raise FormatError(f"{config_file}: peft_type {config.get('peft_type')!r} is not supported (LORA only)")
    try:
        r, alpha = int(config["r"]), float(config["lora_alpha"])
    except (KeyError, TypeError, ValueError):
        raise FormatError(f"{config_file}: missing or invalid 'r' / 'lora_alpha'") from None
    adapter = Adapter(root, config, r, alpha, bool(config.get("use_rslora")), bool(config.get("use_dora")))
    parts: dict[str, dict[str, torch.Tensor]] = {}
    with open_checkpoint(weights_file) as checkpoint:  # headers checked: truncated files refused
        for key in checkpoint.keys():  # noqa: SIM118 (a Checkpoint, not a dict)
            module, kind = _split_key(key, weights_file)
            parts.setdefault(module, {})[kind] = checkpoint.get(key).float()
    if not parts:
        raise FormatError(f"{weights_file}: holds no LoRA tensors")
    for module, tensors in parts.items():
        for kind in ("lora_A", "lora_B"):
            if kind not in tensors:
                raise FormatError(f"{weights_file}: missing key '{PEFT_PREFIX}{module}.{kind}.weight'")
        a, b, m = tensors["lora_A"], tensors["lora_B"], tensors.get("magnitude")
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise FormatError(f"{weights_file}: {module}: lora_A {list(a.shape)} and lora_B {list(b.shape)} do not fit")
        if adapter.use_dora and m is None:
            raise FormatError(f"{weights_file}: missing key '{PEFT_PREFIX}{module}.lora_magnitude_vector' (DoRA)")
        if m is not None and m.shape != (b.shape[0],):
            raise FormatError(f"{weights_file}: {module}.lora_magnitude_vector has shape {list(m.shape)}, expected [{b.shape[0]}]")
        adapter.modules[module] = LoraPair(a, b, m)
    return adapter


def _split_key(key: str, file: Path) -> tuple[str, str]:
    """'base_model.model.x.y.lora_A.weight' -> ('x.y', 'lora_A')."""
    name = key.removeprefix(PEFT_PREFIX)
    for suffix, kind in ((".lora_A.weight", "lora_A"), (".lora_B.weight", "lora_B"),
                         (".lora_magnitude_vector", "magnitude"), (".lora_magnitude_vector.weight", "magnitude"),
                         (".lora_A.default.weight", "lora_A"), (".lora_B.default.weight", "lora_B")):
        if name.endswith(suffix):
            return name[: -len(suffix)], kind
    raise FormatError(
        f"{file}: tensor '{key}' is not a LoRA tensor (trained embeddings / modules_to_save are not supported by merge)"
    )


def check_adapter_fits(adapter: Adapter, linear_shapes: dict[str, tuple[int, int]], base: Path) -> None:
    """Every adapter target must be a linear of the base with matching (out, in) sizes."""
    for module, pair in adapter.modules.items():
        if module not in linear_shapes:
            raise AdapterMismatchError(
                f"{adapter.path}: adapter targets '{module}', which is not a linear layer of {base} "
                "(adapter trained for another base model?)"
            )
        out_features, in_features = linear_shapes[module]
        if pair.lora_A.shape[1] != in_features or pair.lora_B.shape[0] != out_features:
            raise AdapterMismatchError(
                f"{adapter.path}: '{module}' expects a {pair.lora_B.shape[0]}x{pair.lora_A.shape[1]} weight but "
                f"{base} has {out_features}x{in_features} (adapter trained for another base model?)"
            )


def merged_lora_weight(weight: torch.Tensor, pair: LoraPair, scaling: float) -> torch.Tensor:
    """W + scaling * B @ A in float32; DoRA: magnitude * (W + sBA) / ||W + sBA||_row (PEFT's merge).

    `weight` is (out, in); the result is float32 of the same shape.
    """
    merged = weight.float() + scaling * (pair.lora_B.float() @ pair.lora_A.float())
    if pair.magnitude is not None:
        norm = torch.linalg.norm(merged, dim=1)
        merged = (pair.magnitude.float() / norm).unsqueeze(1) * merged
    return merged
