"""What a model location holds, whatever its format: its weights, its config as a dict, its tokenizer.

A location is a transformers directory (config.json + safetensors, or a Hub snapshot) or a GGUF
file (or a directory holding one). The stages above (`load_model`, merge, quantize) ask these
functions instead of reading config.json or opening safetensors themselves, so a GGUF base works
wherever a transformers directory does.
"""

from __future__ import annotations

import os
from pathlib import Path

from .gguf_checkpoint import GGUFCheckpoint
from .gguf_metadata import gguf_tokenizer
from .json_files import read_json_file
from .model_config import load_config
from .model_location import gguf_file, resolve_model_dir
from .safetensors_io import Checkpoint, open_checkpoint


def open_weights(location: str | os.PathLike, config=None) -> Checkpoint | GGUFCheckpoint:
    """The model's tensors, read one at a time: a checked safetensors checkpoint, or a GGUF file.

    `config`: the transformers config when the caller has it already (GGUF: spares reading it again).
    """
    root = resolve_model_dir(location)
    gguf = gguf_file(root)
    if gguf is not None:
        return GGUFCheckpoint(gguf, config)
    return open_checkpoint(root)


def config_dict(location: str | os.PathLike) -> dict:
    """config.json of a transformers directory as a dict; for a GGUF file, the config transformers builds from it."""
    root = resolve_model_dir(location)
    if gguf_file(root) is None:
        return read_json_file(root, "config.json", "a transformers model directory")
    config = load_config(root)
    raw = config.to_dict()
    if not raw.get("architectures"):  # GGUF metadata names no transformers class; the causal LM is meant
        raw["architectures"] = [_causal_lm_class_name(config)]
    return raw


def _causal_lm_class_name(config) -> str:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type, type(config).__name__.replace("Config", "ForCausalLM"))


def is_gguf(location: str | os.PathLike) -> bool:
    """True when the location is (or holds) a GGUF file."""
    return gguf_file(resolve_model_dir(location)) is not None


def save_tokenizer(location: str | os.PathLike, out_dir: Path) -> bool:
    """Write the tokenizer of a GGUF location as transformers tokenizer files into `out_dir`; False for
    other locations (whose tokenizer files are copied as they are)."""
    gguf = gguf_file(resolve_model_dir(location))
    if gguf is None:
        return False
    gguf_tokenizer(gguf).save_pretrained(out_dir)
    return True
