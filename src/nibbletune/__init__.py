"""nibbletune: QLoRA fine-tuning with its own NF4 engine, byte-compatible with bitsandbytes.

The jobs of the `nibbletune` command as a Python API:

    import nibbletune
    model = nibbletune.load_model("path/or/hub-id")          # transformers model, linears in NF4
    nibbletune.apply_lora(model, nibbletune.LoraSettings(r=16))  # or a peft.LoraConfig
    ...                                                      # train it any way you like, then
    nibbletune.save_adapter(model, "out/adapter")            # PEFT files + the base's QuantSettings
    nibbletune.merge("path/or/hub-id", "out/adapter", "out/merged")
    nibbletune.train("config.yaml")                          # the `nibbletune train` job
    nibbletune.plan("config.yaml").peak_bytes                # `nibbletune plan`: will it fit?
    nibbletune.evaluate_adapter(nibbletune.EvalJob.from_config("config.yaml"))   # `nibbletune eval`

Names are imported on first use, so `import nibbletune` itself imports neither torch nor transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .errors import NibbletuneError

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "QuantizedTensor": "nibbletune.quant",
    "QuantSettings": "nibbletune.quant",
    "quantize": "nibbletune.quant",
    "LoraSettings": "nibbletune.modules",
    "apply_lora": "nibbletune.modules",
    "load_model": "nibbletune.loading",
    "load_tokenizer": "nibbletune.loading",
    "load_adapter": "nibbletune.loading",
    "save_adapter": "nibbletune.loading",
    "TrainConfig": "nibbletune.training",
    "train": "nibbletune.training",
    "plan": "nibbletune.training",
    "MemoryPlan": "nibbletune.training",
    "EvalJob": "nibbletune.evaluation",
    "evaluate_adapter": "nibbletune.evaluation",
    "merge": "nibbletune.export",
    "quantize_checkpoint": "nibbletune.export",
    "export_gguf": "nibbletune.export",
}

__all__ = [
    "NibbletuneError", "__version__", "QuantizedTensor", "QuantSettings", "quantize", "LoraSettings", "apply_lora",
    "load_model", "load_tokenizer", "load_adapter", "save_adapter", "TrainConfig", "train", "plan", "MemoryPlan",
    "EvalJob",
    "evaluate_adapter", "merge", "quantize_checkpoint", "export_gguf",
]

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time __getattr__ imports on demand
    from .evaluation import EvalJob, evaluate_adapter
    from .export import export_gguf, merge, quantize_checkpoint
    from .loading import load_adapter, load_model, load_tokenizer, save_adapter
    from .modules import LoraSettings, apply_lora
    from .quant import QuantizedTensor, QuantSettings, quantize
    from .training import MemoryPlan, TrainConfig, plan, train


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'nibbletune' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
