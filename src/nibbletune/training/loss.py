"""The training loss of a causal LM: its output head and cross-entropy fused (the default), or plain logits.

Fused (`train.fused_loss: true`): the model's decoder runs as usual, and its last hidden states go
with the head's weight into `modules.linear_cross_entropy`, which never builds the [tokens,
vocab] logits. That needs a model whose logits are exactly `lm_head(hidden)`, optionally with
Gemma's final softcap; `FusedHead.of` finds the decoder and the head, and `Trainer` checks the
fused loss against the plain one on a real example before the first step (`agrees_with_logits`),
so an architecture that does anything else between the two (a logit scale, a bias) falls back to
the plain loss with one line instead of training on a wrong one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..data import IGNORE_INDEX
from ..modules.linear_cross_entropy import linear_cross_entropy_sum
from .batches import token_loss_sum


@dataclass(frozen=True)
class FusedHead:
    """The parts of a causal LM the fused loss uses: its decoder, its output head, the final softcap."""

    decoder: nn.Module
    head: nn.Linear
    softcap: float | None

    @classmethod
    def of(cls, model: nn.Module) -> FusedHead | None:
        """The fused-loss view of `model`, or None when its head is not a plain bias-free linear."""
        prefix = getattr(model, "base_model_prefix", "")
        decoder = getattr(model, prefix, None) if prefix else None
        get_head = getattr(model, "get_output_embeddings", None)
        head = get_head() if callable(get_head) else None
        if decoder is None or decoder is model or type(head) is not nn.Linear or head.bias is not None:
            return None
        config = getattr(model, "config", None)
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        return cls(decoder, head, getattr(text_config, "final_logit_softcapping", None))

    def loss_sum(self, inputs: dict, labels: torch.Tensor) -> torch.Tensor:
        """Summed next-token cross-entropy of the batch `inputs` (model kwargs) with unshifted `labels`."""
        hidden = self.decoder(**inputs).last_hidden_state  # [B, T, H]
        shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
        return linear_cross_entropy_sum(hidden.reshape(-1, hidden.shape[-1]), self.head.weight, shifted.reshape(-1),
                                        self.softcap)


def loss_sum(model: nn.Module, inputs: dict, labels: torch.Tensor, fused: FusedHead | None) -> torch.Tensor:
    """Summed next-token cross-entropy of a batch: through `fused` when given, else through the logits."""
    if fused is not None:
        return fused.loss_sum(inputs, labels)
    return token_loss_sum(model(**inputs).logits, labels)


@torch.no_grad()
def agrees_with_logits(model: nn.Module, fused: FusedHead, inputs: dict, labels: torch.Tensor,
                       tolerance: float = 1e-2) -> bool:
    """Whether the fused loss equals the loss through the model's own logits on one batch (relative `tolerance`).

    Run in eval mode (no dropout, so no random draws) and restored to the model's mode afterwards.
    """
    was_training = model.training
    model.eval()
    try:
        fused_value = float(fused.loss_sum(inputs, labels))
        plain_value = float(token_loss_sum(model(**inputs).logits, labels))
    finally:
        model.train(was_training)
    return abs(fused_value - plain_value) <= tolerance * max(abs(plain_value), 1e-6)
