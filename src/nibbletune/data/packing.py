"""Packing samples into fixed-length sequences, and collating examples into batches.

Packing puts whole samples (already truncated to ``seq_len``) into sequences of exactly ``seq_len``
tokens by best-fit decreasing: longest sample first, each into the sequence with the least room that
still fits it. A sample is never split across sequences (its second half would train without its
prompt), so a sequence's unused tail is padding: pad id, label ``-100``. ``position_ids`` restart at 0
at every sample start (and at the padding tail), so each sample gets the positions it would have alone.

What keeps packed samples from attending to each other is the model, not the data:

- transformers' mask builder (``masking_utils``, used by current models for eager, sdpa and flex
  attention, CPU included) turns position-id restarts into a block-diagonal causal mask, but only when
  no ``attention_mask`` is passed and no KV cache is built. So :func:`collate` gives packed batches
  ``position_ids`` and *no* ``attention_mask``; call the model with exactly the keys it returns and
  ``use_cache=False`` (with the default ``use_cache=True`` the model builds a cache, and the mask
  silently spans the whole row). ``tests/data/test_packing.py`` checks this against samples run alone.
- flash_attention_2/3 find the boundaries from ``position_ids`` only for a batch of one row: use
  :func:`flatten_packed` (``[B, T] -> [1, B*T]``) for larger batches.
- A model that builds its own plain causal mask (older or remote-code models) lets a sample attend to
  the samples before it in the same row; positions still restart, and labels never cross a boundary
  (the first token of every sample is untrained).
"""

from __future__ import annotations

from bisect import bisect_left, insort

import torch

from nibbletune.data.tokenize import IGNORE_INDEX, Example


def pack(examples: list[Example], seq_len: int, pad_token_id: int) -> list[Example]:
    """Whole samples packed into sequences of exactly ``seq_len`` tokens; every sample lands in one."""
    order = sorted(range(len(examples)), key=lambda index: -len(examples[index].input_ids))
    bins: list[list[int]] = []
    room: list[tuple[int, int]] = []  # (free tokens, bin index), sorted; full bins leave the list
    for index in order:
        length = len(examples[index].input_ids)
        if length > seq_len:
            raise ValueError(f"sample of {length} tokens does not fit seq_len={seq_len}; truncate first")
        slot = bisect_left(room, (length, -1))
        if slot < len(room):
            free, bin_index = room.pop(slot)
        else:
            free, bin_index = seq_len, len(bins)
            bins.append([])
        bins[bin_index].append(index)
        if free - length > 0:
            insort(room, (free - length, bin_index))
    # each sequence lists its samples in data order, sequences by their first sample
    ordered_bins = sorted((sorted(members) for members in bins), key=lambda members: members[0])
    return [
        _concatenate([examples[index] for index in members], seq_len, pad_token_id)
        for members in ordered_bins
    ]


def _concatenate(samples: list[Example], seq_len: int, pad_token_id: int) -> Example:
    input_ids: list[int] = []
    labels: list[int] = []
    position_ids: list[int] = []
    for sample in samples:
        input_ids += sample.input_ids
        labels += sample.labels
        position_ids += range(len(sample.input_ids))
    padding = seq_len - len(input_ids)
    input_ids += [pad_token_id] * padding
    labels += [IGNORE_INDEX] * padding
    position_ids += range(padding)
    return Example(input_ids, labels, position_ids, " + ".join(sample.source for sample in samples))


def collate(examples: list[Example], pad_token_id: int) -> dict[str, torch.Tensor]:
    """A right-padded batch: ``input_ids``, ``labels`` (``-100`` on padding) and either ``attention_mask``
    (unpacked examples) or ``position_ids`` (packed examples, see the module docstring: no mask on purpose).
    """
    if not examples:
        raise ValueError("collate needs at least one example")
    packed = examples[0].position_ids is not None
    if any((example.position_ids is not None) != packed for example in examples):
        raise ValueError("cannot collate packed and unpacked examples into one batch")
    batch_size, width = len(examples), max(len(example.input_ids) for example in examples)
    input_ids = torch.full((batch_size, width), pad_token_id, dtype=torch.long)
    labels = torch.full((batch_size, width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((batch_size, width), dtype=torch.long)
    position_ids = torch.zeros((batch_size, width), dtype=torch.long)
    for row, example in enumerate(examples):
        length = len(example.input_ids)
        input_ids[row, :length] = torch.tensor(example.input_ids, dtype=torch.long)
        labels[row, :length] = torch.tensor(example.labels, dtype=torch.long)
        attention_mask[row, :length] = 1
        if packed:
            position_ids[row, :length] = torch.tensor(example.position_ids, dtype=torch.long)
            position_ids[row, length:] = torch.arange(width - length)  # padding is its own segment
    if packed:
        return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def flatten_packed(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A packed batch as one row, ``[B, T] -> [1, B*T]``, for flash attention's position-id path."""
    if "position_ids" not in batch:
        raise ValueError("flatten_packed needs a packed batch (one with position_ids)")
    return {key: value.reshape(1, -1) for key, value in batch.items()}
