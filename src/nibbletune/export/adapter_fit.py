"""Checking an adapter against a base model's linear layers, and the merge of one LoRA pair into its weight.

Pure functions over tensors read by `loading.adapter_files.read_adapter`; no model is built.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import NibbletuneError
from ..loading.adapter_files import AdapterFiles, LoraTensors


class AdapterMismatchError(NibbletuneError, ValueError):
    """An adapter that does not fit the base model (other architecture or sizes)."""


def check_adapter_fits(adapter: AdapterFiles, linear_shapes: dict[str, tuple[int, int]], base: Path) -> None:
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


def merged_lora_weight(weight: torch.Tensor, pair: LoraTensors, scaling: float) -> torch.Tensor:
    """W + scaling * B @ A in float32; DoRA: magnitude * (W + sBA) / ||W + sBA||_row (PEFT's merge).

    `weight` is (out, in); the result is float32 of the same shape.
    """
    merged = weight.float() + scaling * (pair.lora_B.float() @ pair.lora_A.float())
    if pair.magnitude is not None:
        norm = torch.linalg.norm(merged, dim=1)
        merged = (pair.magnitude.float() / norm).unsqueeze(1) * merged
    return merged
