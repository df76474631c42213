"""Mixed precision for the training loop: autocast, and dynamic loss scaling for float16.

bfloat16 has float32's exponent range, so gradients neither overflow nor underflow more than in
float32 and autocast alone is enough. float16 tops out at 65504 and flushes magnitudes below
about 6e-8 to zero, so small activation gradients vanish in backward. Loss scaling
(torch.amp.GradScaler, which runs on CPU as well as CUDA) multiplies the loss by a scale S
before backward, so every gradient is S times larger in float16, and divides the adapter
gradients (float32) by S before clipping and the optimizer step. When a scaled gradient
overflowed (inf/NaN after unscaling) the step is skipped, not applied, and S is halved; after
2000 clean steps S doubles. A run whose steps keep overflowing is stopped by the loop
(`MAX_SKIPPED_STEPS`), since S would otherwise shrink forever.

The scaler's state (scale and growth tracker) is plain numbers and is saved in checkpoints.
"""

from __future__ import annotations

import warnings
from contextlib import nullcontext

import torch

MAX_SKIPPED_STEPS = 24
"""Consecutive overflowing float16 steps before the run stops: 16 halvings take the initial scale
2^16 down to 1, so overflows beyond that are not a scale problem."""


def autocast_factory(device: torch.device, dtype: torch.dtype):
    """A no-argument context factory: torch.autocast for bf16/fp16 compute, else a null context."""
    if dtype in (torch.bfloat16, torch.float16):
        return lambda: torch.autocast(device.type, dtype=dtype)
    return nullcontext


class LossScaling:
    """Dynamic loss scaling for float16 compute; a pass-through for every other dtype."""

    def __init__(self, compute_dtype: torch.dtype, device: torch.device):
        self.scaler = torch.amp.GradScaler(device.type) if compute_dtype == torch.float16 else None

    @property
    def enabled(self) -> bool:
        return self.scaler is not None

    @property
    def scale(self) -> float | None:
        """The current loss scale (None without float16)."""
        return float(self.scaler.get_scale()) if self.scaler is not None else None

    def backward(self, loss: torch.Tensor) -> None:
        """loss.backward(), of the scaled loss under float16."""
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def unscale(self, optimizer: torch.optim.Optimizer) -> None:
        """Divide the gradients by the scale (before clipping); records whether any overflowed."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> bool:
        """optimizer.step() unless the float16 gradients overflowed; returns whether it was applied."""
        if self.scaler is None:
            optimizer.step()
            return True
        scale_before = self.scaler.get_scale()
        self.scaler.step(optimizer)
        self.scaler.update()
        return self.scaler.get_scale() >= scale_before  # update() halves the scale after a skipped step

    def state_dict(self) -> dict | None:
        return self.scaler.state_dict() if self.scaler is not None else None

    def load_state_dict(self, state: dict | None) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)


def step_scheduler(scheduler, applied: bool) -> None:
    """scheduler.step(), silencing torch's 'scheduler before optimizer' warning after a skipped first step."""
    if applied:
        scheduler.step()
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
        scheduler.step()
