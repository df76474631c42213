"""Learning-rate schedules: linear warmup from 0, then cosine, linear or constant.

The schedule is a pure function of the step, so a resumed run needs only the step number;
`build_scheduler` wraps it in torch's LambdaLR so its state_dict is plain numbers (JSON).
"""

from __future__ import annotations

import math

import torch


def lr_factor(step: int, total_steps: int, warmup_steps: int, kind: str) -> float:
    """Multiplier of the peak lr for the update made at `step` (0-based).

    warmup: (step + 1) / (warmup_steps + 1) for step < warmup_steps, so the first update is
    not zero; then over the remaining `total_steps - warmup_steps` steps, with progress
    p = (step - warmup_steps) / (remaining), cosine gives 0.5 (1 + cos(pi p)), linear 1 - p,
    constant 1.
    """
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if kind == "constant":
        return 1.0
    remaining = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / remaining)
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if kind == "linear":
        return 1.0 - progress
    raise ValueError(f"unknown scheduler {kind!r}")


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int, kind: str):
    """A LambdaLR following `lr_factor`."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, warmup_steps, kind))
