"""QuantSettings: the one description of how a base model's linear weights are stored in 4 bits.

It travels unchanged from the training config (`quant:` section) through `load_model`, the
adapter's record (`nibbletune.json`, which adds its format version), and into `merge`,
`quantize` and `generate`, so every stage rebuilds the same base. As JSON (`to_record`):

    {"quant_type": "nf4", "blocksize": 64, "double_quant": true, "compute_dtype": "float32",
     "skip_modules": []}

Conversions to and from the bitsandbytes / transformers spelling
(`BitsAndBytesConfig`, a checkpoint's `quantization_config`) live here too, so the two
vocabularies meet in one place.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from ..devices import COMPUTE_DTYPE_NAMES, dtype_name, resolve_compute_dtype
from ..errors import BnbFormatUnsupportedError, QuantizationError
from .blockwise import SUPPORTED_BLOCKSIZES
from .codebooks import BNB_QUANT_TYPES, QUANT_TYPES


@dataclass(frozen=True)
class QuantSettings:
    """How the frozen linear weights of a base model are quantized and computed with."""

    quant_type: str = "nf4"
    """4-bit code book: "nf4" (NormalFloat), "fp4", or "int4" (uniform; not a bitsandbytes type)."""
    blocksize: int = 64
    """Weights per absmax scale."""
    double_quant: bool = True
    """Store the per-block absmax as 8-bit codes too (4.127 instead of 4.5 bits per weight at blocksize 64)."""
    compute_dtype: str = "auto"
    """dtype of activations and dequantized weights: auto (bf16 on CUDA and native-bf16 CPUs, else
    float32), float32, bfloat16 or float16."""
    skip_modules: tuple[str, ...] = field(default=())
    """Linears kept in 16 bits, named by whole dotted components ("down_proj", "layers.0")."""

    def __post_init__(self) -> None:
        if self.quant_type not in QUANT_TYPES:
            raise QuantizationError(f"quant_type must be one of {QUANT_TYPES}, got {self.quant_type!r}")
        if self.blocksize not in SUPPORTED_BLOCKSIZES:
            raise QuantizationError(f"blocksize must be one of {SUPPORTED_BLOCKSIZES}, got {self.blocksize!r}")
        if not isinstance(self.double_quant, bool):
            raise QuantizationError(f"double_quant must be true or false, got {self.double_quant!r}")
        name = dtype_name(self.compute_dtype) if isinstance(self.compute_dtype, torch.dtype) else self.compute_dtype
        if name not in COMPUTE_DTYPE_NAMES:
            raise QuantizationError(f"compute_dtype must be one of {COMPUTE_DTYPE_NAMES}, got {self.compute_dtype!r}")
        object.__setattr__(self, "compute_dtype", name)
        if isinstance(self.skip_modules, str):
            raise QuantizationError(f"skip_modules must be a list of module names, got the string {self.skip_modules!r}")
        object.__setattr__(self, "skip_modules", tuple(str(name) for name in self.skip_modules))

    def torch_compute_dtype(self, device: str | torch.device = "cpu") -> torch.dtype:
        """The compute dtype as a torch dtype, "auto" resolved for `device`."""
        return resolve_compute_dtype(self.compute_dtype, device)

    def resolved(self, device: str | torch.device = "cpu") -> QuantSettings:
        """The same settings with "auto" replaced by the dtype it means on `device` (what a record stores)."""
        return replace(self, compute_dtype=dtype_name(self.torch_compute_dtype(device)))

    def with_changes(self, **changes: Any) -> QuantSettings:
        """A copy with some fields changed; None values are ignored (unset command-line options)."""
        return replace(self, **{key: value for key, value in changes.items() if value is not None})

    # -- the adapter record (nibbletune.json) ------------------------------------------------------

    def to_record(self) -> dict:
        """The settings as a JSON object (what adapter records and loftq.json hold)."""
        return dict(asdict(self), skip_modules=list(self.skip_modules))

    @classmethod
    def from_record(cls, record: dict, source: str = "record") -> QuantSettings:
        """Read `to_record`'s JSON; QuantizationError naming `source` when malformed (other keys are ignored)."""
        if not isinstance(record, dict):
            raise QuantizationError(f"{source}: expected a JSON object of quantization settings, got {record!r}")
        known = {"quant_type", "blocksize", "double_quant", "compute_dtype", "skip_modules"}
        values = {key: record[key] for key in known if record.get(key) is not None}
        missing = {"quant_type", "blocksize", "double_quant"} - set(values)
        if missing:
            raise QuantizationError(f"{source}: quantization settings lack {sorted(missing)}")
        try:
            return cls(**values)
        except (QuantizationError, TypeError) as exc:
            raise QuantizationError(f"{source}: {exc}") from None

    # -- bitsandbytes / transformers spelling -----------------------------------------------------

    @classmethod
    def from_bnb_config(cls, config: Any) -> QuantSettings:
        """Settings equal to a transformers `BitsAndBytesConfig` (or its dict / a checkpoint's quantization_config).

        Only 4-bit bitsandbytes configs are accepted; `bnb_4bit_quant_storage` must be uint8 or
        unset, and `llm_int8_skip_modules` becomes `skip_modules`.
        """
        raw = config if isinstance(config, dict) else config.to_dict()
        method = raw.get("quant_method", "bitsandbytes")
        method = getattr(method, "value", method)  # transformers' QuantizationMethod enum
        if method != "bitsandbytes" or not raw.get("load_in_4bit"):
            raise QuantizationError(f"quantization_config must be a bitsandbytes 4-bit config (load_in_4bit), "
                                    f"got quant_method {method!r}, load_in_4bit {raw.get('load_in_4bit')!r}")
        storage = raw.get("bnb_4bit_quant_storage") or "uint8"
        if dtype_name(storage) != "uint8":
            raise QuantizationError(f"bnb_4bit_quant_storage {storage!r} is not supported (only uint8)")
        compute = raw.get("bnb_4bit_compute_dtype")
        quant_type = raw.get("bnb_4bit_quant_type", "fp4")  # bitsandbytes' own default
        if quant_type not in BNB_QUANT_TYPES:
            raise QuantizationError(f"bnb_4bit_quant_type must be one of {BNB_QUANT_TYPES}, got {quant_type!r}")
        return cls(
            quant_type=quant_type,
            blocksize=int(raw.get("bnb_4bit_blocksize") or 64),
            double_quant=bool(raw.get("bnb_4bit_use_double_quant", False)),
            compute_dtype=dtype_name(compute) if compute is not None else "float32",
            skip_modules=tuple(raw.get("llm_int8_skip_modules") or ()),
        )

    def bnb_quantization_config(self) -> dict:
        """`quantization_config` exactly as transformers' BitsAndBytesConfig saves it (5.x), for checkpoints.

        An "auto" compute dtype is written as float32 (call `resolved()` first to record what auto meant).
        Raises BnbFormatUnsupportedError for a code book bitsandbytes lacks (int4).
        """
        check_bnb_quant_type(self.quant_type)
        compute = "float32" if self.compute_dtype == "auto" else self.compute_dtype
        return {
            "_load_in_4bit": True,
            "_load_in_8bit": False,
            "bnb_4bit_compute_dtype": compute,
            "bnb_4bit_quant_storage": "uint8",
            "bnb_4bit_quant_type": self.quant_type,
            "bnb_4bit_use_double_quant": self.double_quant,
            "llm_int8_enable_fp32_cpu_offload": False,
            "llm_int8_has_fp16_weight": False,
            "llm_int8_skip_modules": list(self.skip_modules) or None,
            "llm_int8_threshold": 6.0,
            "load_in_4bit": True,
            "load_in_8bit": False,
            "quant_method": "bitsandbytes",
        }

    def describe(self) -> str:
        """One line for logs: "nf4, blocksize 64, double quant, compute bfloat16"."""
        parts = [self.quant_type, f"blocksize {self.blocksize}", "double quant" if self.double_quant else "no double quant",
                 f"compute {self.compute_dtype}"]
        if self.skip_modules:
            parts.append(f"16-bit: {', '.join(self.skip_modules)}")
        return ", ".join(parts)


def check_bnb_quant_type(quant_type: str, what: str = "the bitsandbytes 4-bit format") -> None:
    """Raise BnbFormatUnsupportedError unless bitsandbytes knows `quant_type` (nf4, fp4), naming `what` is written."""
    if quant_type not in BNB_QUANT_TYPES:
        raise BnbFormatUnsupportedError(
            f"quant type {quant_type!r} cannot be written as {what}: bitsandbytes has only {'/'.join(BNB_QUANT_TYPES)} "
            f"(train and merge work with {quant_type}; use nf4 or fp4 for a bitsandbytes checkpoint)")
