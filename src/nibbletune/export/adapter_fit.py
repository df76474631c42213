"""The merge of one LoRA pair into its weight: a pure function over tensors read by `loading.read_adapter`."""

from __future__ import annotations

import torch

from ..loading.adapter_files import LoraTensors


def merged_lora_weight(weight: torch.Tensor, pair: LoraTensors, scaling: float) -> torch.Tensor:
    """W + scaling * B @ A in float32; DoRA: magnitude * (W + sBA) / ||W + sBA||_row (PEFT's merge).

    `weight` is (out, in); the result is float32 of the same shape.
    """
    merged = weight.float() + scaling * (pair.lora_B.float() @ pair.lora_A.float())
    if pair.magnitude is not None:
        norm = torch.linalg.norm(merged, dim=1)
        merged = (pair.magnitude.float() / norm).unsqueeze(1) * merged
    return merged
