"""Greedy generation for a list of prompts, batched, deterministic.

Prompts are sorted by length and run `batch_size` at a time, left-padded (the pad id, with a
zero attention mask), through transformers' `model.generate` with do_sample off: the argmax
token at every step, until a stop token or `max_new_tokens`. The model is put in eval mode
(no LoRA dropout) and restored after. The same prompts, batch size, model and device give the
same tokens; a different batch size may change a token where two logits nearly tie, since
padded batches of other shapes run other matmul kernels.
"""

from __future__ import annotations

import torch


def generation_stop_ids(model, stop_ids: frozenset[int]) -> list[int]:
    """`stop_ids` plus the EOS ids of the model's generation config (e.g. Llama 3's <|eot_id|>), sorted."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    extra = [configured] if isinstance(configured, int) else list(configured or [])
    return sorted(set(stop_ids) | set(extra))


@torch.no_grad()
def greedy_generate(model, prompts: list[tuple[int, ...]], stop_ids: list[int], pad_token_id: int,
                    max_new_tokens: int, batch_size: int, autocast) -> list[list[int]]:
    """The new token ids of each prompt's greedy continuation, ending before its first stop token."""
    from transformers import GenerationConfig

    config = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=stop_ids,
                              pad_token_id=pad_token_id, use_cache=True)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    order = sorted(range(len(prompts)), key=lambda index: len(prompts[index]))
    continuations: list[list[int]] = [[] for _ in prompts]
    for start in range(0, len(order), batch_size):
        chosen = order[start:start + batch_size]
        width = max(len(prompts[index]) for index in chosen)
        input_ids = torch.tensor([[pad_token_id] * (width - len(prompts[i])) + list(prompts[i]) for i in chosen])
        attention_mask = torch.tensor([[0] * (width - len(prompts[i])) + [1] * len(prompts[i]) for i in chosen])
        with autocast():
            output = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                    generation_config=config)  # (B, width + new tokens)
        for row, index in enumerate(chosen):
            continuations[index] = _until_stop(output[row, width:].tolist(), stop_ids)
    model.train(was_training)
    return continuations


def _until_stop(token_ids: list[int], stop_ids: list[int]) -> list[int]:
    stops = set(stop_ids)
    for position, token in enumerate(token_ids):
        if token in stops:
            return token_ids[:position]
    return token_ids
