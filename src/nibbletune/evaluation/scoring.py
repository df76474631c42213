"""Scoring one loaded model on held-out data: loss, perplexity and the generation match rates."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..training.batches import evaluate
from ..training.precision import autocast_factory
from .generation import generation_stop_ids, greedy_generate
from .metrics import match_rates, perplexity
from .tasks import HeldOutData


@dataclass(frozen=True)
class ModelScores:
    """What one model scored. Rates are fractions of the generation examples (None without any)."""

    loss: float
    """Mean next-token cross-entropy (nats) over every supervised token of the held-out examples."""
    perplexity: float
    """exp(loss) (loss capped at 50, as training logs it)."""
    exact_match: float | None
    first_lines_match: float | None
    contains_answer: float | None
    generations: tuple[str, ...] = ()
    """The greedy continuation of each generation task, decoded without special tokens, in task order."""

    METRICS = ("loss", "perplexity", "exact_match", "first_lines_match", "contains_answer")

    def metrics(self) -> dict[str, float | None]:
        """The scores by name (METRICS order), without the generations."""
        return {name: getattr(self, name) for name in self.METRICS}


def score_model(model, tokenizer, data: HeldOutData, batch_size: int, max_new_tokens: int,
                compute_dtype: torch.dtype) -> ModelScores:
    """Loss over `data.examples` (`training.batches.evaluate`) and greedy generation on `data.tasks`."""
    device = next(model.parameters()).device
    autocast = autocast_factory(device, compute_dtype)
    loss = evaluate(model, data.examples, batch_size, data.pad_token_id, device, autocast)
    generations: list[str] = []
    if data.tasks:
        new_ids = greedy_generate(model, [task.prompt_ids for task in data.tasks],
                                  generation_stop_ids(model, data.stop_ids), data.pad_token_id, max_new_tokens,
                                  batch_size, autocast)
        generations = [tokenizer.decode(ids, skip_special_tokens=True) for ids in new_ids]
    rates = match_rates(generations, [task.reference for task in data.tasks])
    return ModelScores(loss=loss, perplexity=perplexity(loss), generations=tuple(generations), **rates)
