"""The model a training run starts from, for each method, with its seeded adapters.

* qlora: `load_model` (4-bit linears, the run's QuantSettings) + `apply_lora`; with lora.init
  loftq the base linears are quantized with LoftQ while they stream in (the only time their
  full-precision weights exist), then the LoRA factors are copied in;
* lora: the base loaded unquantized in the compute dtype (frozen) + `apply_lora`;
* full: the base loaded in float32, every parameter trainable; autocast computes in the compute
  dtype, so the optimizer updates float32 master weights.
"""

from __future__ import annotations

import random
from dataclasses import replace

import numpy as np
import torch

from ..devices import resolve_compute_dtype
from .config import ConfigError, TrainConfig


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def loftq_base(config: TrainConfig):
    """The LoftQ quantizer for `load_model` when lora.init is loftq, else None."""
    if config.lora.init != "loftq":
        return None
    from ..modules.loftq_base import LoftQBase

    return LoftQBase(config.lora.settings(), config.quant.settings())


def _base_model(config: TrainConfig, device: torch.device, loftq):
    from ..loading import load_model, load_unquantized

    if config.method == "qlora":
        quant = config.quant.settings().resolved(device)  # "auto" as autocast resolves it
        return load_model(config.model, quant, quantize_weight=loftq)
    if config.method == "lora":
        return load_unquantized(config.model, resolve_compute_dtype(config.quant.compute_dtype, device))
    return load_unquantized(config.model, torch.float32)


def prepare_model(config: TrainConfig, device: torch.device):
    """The model to train, on `device` and in train mode; returns (model, LoraSettings or None for method full)."""
    from ..modules import apply_lora

    loftq = loftq_base(config)
    model = _base_model(config, device, loftq)
    seed_everything(config.train.seed)
    settings = None
    if config.method == "full":
        model.requires_grad_(True)
    else:
        settings = config.lora.settings()
        targets = apply_lora(model, replace(settings, init="default") if loftq else settings)
        if not targets:
            raise ConfigError(f"'lora.target_modules' {config.lora.target_modules!r} matches no linear layer")
        if loftq:
            loftq.apply(model)
            model.loftq_note = loftq.note()
    model.to(device)
    if config.train.gradient_checkpointing:
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if hasattr(model, "config"):
        model.config.use_cache = False
    model.train()
    return model, settings
