"""A model directory's config.json as a transformers config, and the model class to build from it."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import FormatError, NibbletuneError
from .gguf_metadata import gguf_config
from .json_files import read_json_file
from .model_location import gguf_file, resolve_model_dir

CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")


class UnsupportedModelError(NibbletuneError, ValueError):
    """A model type transformers does not know, or one needing remote code that was not allowed."""


def load_config(root: str | os.PathLike, trust_remote_code: bool = False):
    """Read `root/config.json` as a transformers config; refuse unknown types and unrequested remote code.

    `root` may also be a Hugging Face Hub id (see `model_location.resolve_model_dir`), or a GGUF
    file (or a directory holding one), whose config transformers builds from the file's metadata.
    """
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    root = resolve_model_dir(root)
    gguf = gguf_file(root)
    if gguf is not None:
        return gguf_config(gguf)
    config_file = root / "config.json"
    raw = read_json_file(root, "config.json", "a transformers model directory")
    model_type = raw.get("model_type")
    if "auto_map" in raw and not trust_remote_code and model_type not in CONFIG_MAPPING_NAMES:
        raise UnsupportedModelError(
            f"{config_file}: model_type {model_type!r} needs the checkpoint's own Python code; "
            "pass trust_remote_code=True if you trust it"
        )
    if model_type is None:
        raise FormatError(f"{config_file}: no 'model_type' key")
    if model_type not in CONFIG_MAPPING_NAMES and "auto_map" not in raw:
        raise UnsupportedModelError(
            f"{config_file}: unknown model_type {model_type!r} (not supported by the installed transformers)"
        )
    try:
        return AutoConfig.from_pretrained(root, trust_remote_code=trust_remote_code)
    except (ValueError, OSError, KeyError, TypeError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FormatError(f"{config_file}: cannot build the config ({first_line})") from None


def pop_bnb_config(config, root: Path) -> dict | None:
    """Remove and return a bitsandbytes 4-bit `quantization_config` (None when absent)."""
    qconfig = getattr(config, "quantization_config", None)
    if qconfig is None:
        return None
    qconfig = qconfig if isinstance(qconfig, dict) else qconfig.to_dict()
    if qconfig.get("quant_method") != "bitsandbytes" or not qconfig.get("load_in_4bit"):
        raise FormatError(
            f"{root / 'config.json'}: quantization_config {qconfig.get('quant_method')!r} is not supported "
            "(only bitsandbytes load_in_4bit checkpoints)"
        )
    del config.quantization_config
    return qconfig


def model_class_for(config, model_class: type | str | None = None):
    """The transformers class to build: `model_class` (a class or a name), else from the config.

    Names: "causal-lm", "base", "masked-lm", "sequence-classification". By default a config whose
    architectures name a causal LM gets AutoModelForCausalLM, anything else (BERT encoders) AutoModel.
    """
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    named = {
        "causal-lm": transformers.AutoModelForCausalLM,
        "base": transformers.AutoModel,
        "masked-lm": transformers.AutoModelForMaskedLM,
        "sequence-classification": transformers.AutoModelForSequenceClassification,
    }
    if isinstance(model_class, str):
        if model_class not in named:
            raise NibbletuneError(f"model_class {model_class!r} unknown: expected one of {sorted(named)} or a class")
        return named[model_class]
    if model_class is not None:
        return model_class
    architectures = getattr(config, "architectures", None) or []
    if architectures:
        causal = any(a.endswith(CAUSAL_SUFFIXES) for a in architectures)
    else:
        causal = config.model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES
    return named["causal-lm" if causal else "base"]
