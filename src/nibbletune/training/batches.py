"""Micro-batches in a seeded order, the token-level loss, and the eval loss.

The data order of epoch e is a permutation drawn from its own generator seeded with
(seed, e), so the stream is a pure function of (seed, position): a checkpoint stores only the
position (micro-batches handed out) to resume it exactly. Losses are sums over trained tokens
(labels != -100, unshifted as in transformers), so the loop can divide by the trained tokens
of a whole accumulated step.
"""

from __future__ import annotations

import math

import torch

from ..data import IGNORE_INDEX, collate


class BatchStream:
    """Micro-batches in a seeded per-epoch order; `position` counts micro-batches handed out."""

    def __init__(self, examples: list, micro_batch_size: int, seed: int, pad_token_id: int, position: int = 0):
        self.examples = examples
        self.micro_batch_size = micro_batch_size
        self.seed = seed
        self.pad_token_id = pad_token_id
        self.per_epoch = math.ceil(len(examples) / micro_batch_size)
        self.position = position
        self._order_epoch, self._order = -1, None

    def next(self) -> dict[str, torch.Tensor]:
        """The next micro-batch, collated."""
        return collate([self.examples[i] for i in self.next_indices()], self.pad_token_id)

    def next_indices(self) -> list[int]:
        """The example indices of the next micro-batch (fewer than micro_batch_size at an epoch's end)."""
        epoch, index = divmod(self.position, self.per_epoch)
        if epoch != self._order_epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._order, self._order_epoch = torch.randperm(len(self.examples), generator=generator).tolist(), epoch
        chosen = self._order[index * self.micro_batch_size:(index + 1) * self.micro_batch_size]
        self.position += 1
        return chosen


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropy over trained positions (labels are unshifted, HF style).

    The labels are shifted left (the last position gets IGNORE_INDEX) instead of slicing the
    logits, so the [B, T, V] logits are neither copied here nor zero-filled in backward.
    """
    shifted_labels = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)  # (B, T)
    return torch.nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.size(-1)), shifted_labels.reshape(-1),
        ignore_index=IGNORE_INDEX, reduction="sum")


def trained_tokens(labels: torch.Tensor) -> int:
    """Positions whose next-token loss is trained (labels shifted by one, -100 excluded)."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def model_inputs(batch: dict, device: torch.device) -> dict:
    """The batch without its labels, on `device` (the model's keyword arguments)."""
    return {k: v.to(device) for k, v in batch.items() if k != "labels"}


@torch.no_grad()
def evaluate(model, examples: list, micro_batch_size: int, pad_token_id: int, device, autocast, fused=None) -> float:
    """Mean next-token loss over every trained token of `examples`.

    `fused`: a `loss.FusedHead` of `model` to compute it without the full logits (None: through the logits).
    """
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(examples), micro_batch_size):
        batch = collate(examples[start:start + micro_batch_size], pad_token_id)
        labels, inputs = batch["labels"].to(device), model_inputs(batch, device)
        with autocast():
            total += float(fused.loss_sum(inputs, labels) if fused is not None
                           else token_loss_sum(model(**inputs).logits, labels))
        count += trained_tokens(batch["labels"])
    model.train(was_training)
    return total / max(count, 1)
