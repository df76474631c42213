"""LoraSettings: which linears get LoRA adapters, and how they are shaped, scaled and initialised.

The fields mean what PEFT's LoraConfig fields of the same purpose mean (`r`, `lora_alpha` as
`alpha`, `lora_dropout` as `dropout`, `target_modules`, `use_rslora`, `use_dora`), so an adapter
describes the same modules and the same function in both libraries. `from_peft` accepts a
`peft.LoraConfig` (peft stays optional: it is only touched when one is passed) and refuses the
fields whose meaning nibbletune does not implement, rather than silently dropping them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import NibbletuneError

INITS = ("default", "gaussian", "loftq")
ADAPTER_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# PEFT LoraConfig fields nibbletune cannot honour, each with the values that mean "not used".
UNSUPPORTED_PEFT_FIELDS = {
    "modules_to_save": (None, []),
    "rank_pattern": (None, {}),
    "alpha_pattern": (None, {}),
    "layers_to_transform": (None,),
    "layers_pattern": (None, [], ""),
    "lora_bias": (None, False),
    "layer_replication": (None,),
    "alora_invocation_tokens": (None,),
    "trainable_token_indices": (None,),
    "target_parameters": (None, []),
    "exclude_modules": (None, [], ""),
    "fan_in_fan_out": (None, False),
    "bias": (None, "none"),
}


def lora_scaling(r: int, alpha: float, use_rslora: bool) -> float:
    """alpha / r, or alpha / sqrt(r) with rank-stabilised LoRA."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


@dataclass
class LoraSettings:
    """Which linears get LoRA adapters and how they are shaped and initialised."""

    r: int = 16
    """Rank of the update B @ A."""
    alpha: float = 32
    """Scale numerator: the update is multiplied by alpha / r (alpha / sqrt(r) with rsLoRA)."""
    dropout: float = 0.05
    """Dropout on the LoRA branch input during training."""
    target_modules: str | list[str] = "all-linear"
    """"all-linear", a list of module names (last component or full path), or a full-match regex."""
    use_rslora: bool = False
    """Rank-stabilised scaling alpha / sqrt(r)."""
    use_dora: bool = False
    """DoRA: learn a per-output-row magnitude on top of LoRA."""
    init: str = "default"
    """"default" (A kaiming-uniform, B zeros), "gaussian", or "loftq" (needs the full-precision weights)."""
    loftq_iters: int = 1
    """Alternating quantize / SVD rounds of init="loftq" (PEFT's loftq_iter)."""
    adapter_dtype: str = "float32"
    """dtype of the adapter parameters: float32, bfloat16 or float16."""

    @property
    def scaling(self) -> float:
        """The factor applied to B @ A x."""
        return lora_scaling(self.r, self.alpha, self.use_rslora)

    def torch_adapter_dtype(self) -> torch.dtype:
        """The torch dtype named by `adapter_dtype` (NibbletuneError for another name)."""
        if self.adapter_dtype not in ADAPTER_DTYPES:
            raise NibbletuneError(f"adapter_dtype must be one of {sorted(ADAPTER_DTYPES)}, got {self.adapter_dtype!r}")
        return ADAPTER_DTYPES[self.adapter_dtype]

    @classmethod
    def from_peft(cls, config: Any, source: str = "peft.LoraConfig", new_adapter: bool = False) -> LoraSettings:
        """Settings from a `peft.LoraConfig` or the dict of an `adapter_config.json`.

        `new_adapter`: the settings initialise fresh adapters (apply_lora), so PEFT's
        `init_lora_weights=False` (random B, a PEFT testing aid) is refused; when an adapter's
        weights are loaded the init field does not matter.

        Raises NibbletuneError naming `source` and the field for anything nibbletune cannot honour
        (rank/alpha patterns, modules_to_save, bias training, ...), for a peft_type other than
        LORA and for missing or mistyped r / lora_alpha / target_modules.
        """
        raw = dict(config) if isinstance(config, dict) else config.to_dict()
        peft_type = str(raw.get("peft_type", "LORA")).removeprefix("PeftType.")
        if peft_type != "LORA":
            raise NibbletuneError(f"{source}: peft_type is {peft_type!r}, only 'LORA' adapters are supported")
        for field in ("r", "lora_alpha", "target_modules"):
            if raw.get(field) is None:
                raise NibbletuneError(f"{source}: missing '{field}'")
        for field, neutral in UNSUPPORTED_PEFT_FIELDS.items():
            value = raw.get(field)
            if isinstance(value, (set, tuple)):
                value = list(value)
            if value not in neutral:
                raise NibbletuneError(f"{source}: '{field}' = {raw[field]!r} is not supported")
        r, alpha, targets = raw["r"], raw["lora_alpha"], raw["target_modules"]
        if isinstance(targets, (set, tuple)):
            targets = sorted(targets)
        if isinstance(r, bool) or not isinstance(r, int) or r <= 0 or isinstance(alpha, bool) \
                or not isinstance(alpha, (int, float)):
            raise NibbletuneError(f"{source}: r must be a positive integer and lora_alpha a number, "
                                  f"got r={r!r}, lora_alpha={alpha!r}")
        if not (isinstance(targets, str) or (isinstance(targets, list) and all(isinstance(t, str) for t in targets))):
            raise NibbletuneError(f"{source}: target_modules must be a string or a list of strings, got {targets!r}")
        init = raw.get("init_lora_weights", True)
        if init not in (True, False, "gaussian") or (new_adapter and init is False):
            raise NibbletuneError(f"{source}: init_lora_weights={init!r} is not supported for new adapters "
                                  "(true or 'gaussian'; LoftQ is LoraSettings(init='loftq'))")
        return cls(r=r, alpha=alpha, dropout=float(raw.get("lora_dropout") or 0.0), target_modules=targets,
                   use_rslora=bool(raw.get("use_rslora", False)), use_dora=bool(raw.get("use_dora", False)),
                   init="gaussian" if init == "gaussian" else "default")

    def check(self) -> None:
        """Raise NibbletuneError for values no LoRA layer can take."""
        if isinstance(self.r, bool) or int(self.r) != self.r or self.r <= 0:
            raise NibbletuneError(f"LoRA rank r must be a positive integer, got {self.r!r}")
        if self.init not in INITS:
            raise NibbletuneError(f"LoRA init must be one of {INITS}, got {self.init!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise NibbletuneError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if self.loftq_iters < 1:
            raise NibbletuneError(f"LoftQ rounds must be at least 1, got {self.loftq_iters}")
        self.torch_adapter_dtype()
