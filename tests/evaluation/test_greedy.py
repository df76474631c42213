"""Batched greedy generation equals a one-prompt-at-a-time argmax loop without a KV cache."""

from __future__ import annotations

from contextlib import nullcontext

import torch
from eval_helpers import SEQ_LEN

import nibbletune
from nibbletune.evaluation import held_out_data
from nibbletune.evaluation.generation import generation_stop_ids, greedy_generate

MAX_NEW = 6


def argmax_loop(model, prompt: tuple[int, ...], stop_ids: list[int]) -> list[int]:
    ids, new = torch.tensor([prompt]), []
    with torch.no_grad():
        for _ in range(MAX_NEW):
            token = int(model(input_ids=ids, use_cache=False).logits[0, -1].argmax())
            if token in stop_ids:
                break
            new.append(token)
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return new


def test_batched_generation_is_the_argmax_loop(trained):
    tokenizer = nibbletune.load_tokenizer(trained.base)
    data = held_out_data(trained.eval_path, tokenizer, "completion", SEQ_LEN, limit=6)
    model = nibbletune.load_model(trained.base, nibbletune.QuantSettings(compute_dtype="float32"))
    stops = generation_stop_ids(model, data.stop_ids)
    assert tokenizer.eos_token_id in stops
    prompts = [task.prompt_ids for task in data.tasks]
    assert len({len(prompt) for prompt in prompts}) > 1  # batches are left-padded
    for with_adapter in (False, True):
        if with_adapter:
            nibbletune.load_adapter(model, trained.output_dir)
        expected = [argmax_loop(model, prompt, stops) for prompt in prompts]
        for batch_size in (1, 4):
            generated = greedy_generate(model, prompts, stops, data.pad_token_id, MAX_NEW, batch_size, nullcontext)
            assert generated == expected, (with_adapter, batch_size)
    assert not model.training
