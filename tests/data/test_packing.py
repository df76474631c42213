"""Packing keeps every sample whole with its own positions; collate builds what the model needs."""

from __future__ import annotations

import pytest
import torch
from data_helpers import write_rows
from hypothesis import given, settings
from hypothesis import strategies as st

from nibbletune.data import Example, build_dataset, collate, flatten_packed
from nibbletune.data.packing import pack

M = -100


def _sample(length: int, tag: int) -> Example:
    ids = [tag * 1000 + index for index in range(length)]
    return Example(ids, [M] + ids[1:], None, f"s{tag}")


def _unpack(packed: list[Example]) -> list[tuple[list[int], list[int], str]]:
    """The samples inside packed sequences, found from position-id restarts and sources."""
    samples = []
    for sequence in packed:
        starts = [index for index, position in enumerate(sequence.position_ids) if position == 0]
        sources = sequence.source.split(" + ")
        for number, source in enumerate(sources):
            end = starts[number + 1] if number + 1 < len(starts) else len(sequence.input_ids)
            samples.append(
                (sequence.input_ids[starts[number] : end], sequence.labels[starts[number] : end], source)
            )
    return samples


@settings(max_examples=60, deadline=None)
@given(lengths=st.lists(st.integers(1, 16), min_size=1, max_size=40), seq_len=st.integers(16, 40))
def test_pack_keeps_every_sample_whole_in_exact_length_sequences(lengths, seq_len):
    samples = [_sample(length, tag) for tag, length in enumerate(lengths)]
    packed = pack(samples, seq_len, pad_token_id=-1)
    assert all(len(s.input_ids) == len(s.labels) == len(s.position_ids) == seq_len for s in packed)
    found = sorted(_unpack(packed), key=lambda sample: sample[2])
    expected = sorted(((s.input_ids, s.labels, s.source) for s in samples), key=lambda sample: sample[2])
    assert found == expected  # no sample lost, split or duplicated
    for sequence in packed:
        used = sum(
            len(sample.input_ids) for sample in samples if sample.source in sequence.source.split(" + ")
        )
        assert sequence.input_ids[used:] == [-1] * (seq_len - used)
        assert sequence.labels[used:] == [M] * (seq_len - used)
        assert sequence.position_ids[used:] == list(range(seq_len - used))
    # best-fit decreasing never needs more sequences than twice the lower bound (it is within 11/9)
    assert len(packed) <= 2 * -(-sum(lengths) // seq_len)


def test_pack_position_ids_restart_at_each_sample(tmp_path, word_tokenizer):
    rows = [{"text": "a b c"}, {"text": "d e"}, {"text": "f g h a b c d"}, {"text": "e"}]
    path = write_rows(tmp_path / "data.jsonl", rows)
    unpacked = build_dataset(path, word_tokenizer, seq_len=12)
    packed = build_dataset(path, word_tokenizer, seq_len=12, packing=True)
    lengths = [len(example.input_ids) for example in unpacked.examples]
    assert lengths == [5, 4, 9, 3]
    # best fit decreasing: 9 + 3 and 5 + 4 (+ 3 padding)
    assert [example.position_ids for example in packed.examples] == [
        list(range(5)) + list(range(4)) + list(range(3)),
        list(range(9)) + list(range(3)),
    ]
    assert packed.examples[0].source.endswith("data.jsonl:1 + " + str(path) + ":2")
    first = unpacked.examples[0].input_ids + unpacked.examples[1].input_ids
    assert packed.examples[0].input_ids == first + [word_tokenizer.pad_token_id] * 3
    assert packed.stats.sequences == 2 and packed.stats.kept == 4
    assert packed.stats.padding_fraction == pytest.approx(3 / 24)
    assert packed.pad_token_id == word_tokenizer.pad_token_id


def test_collate_pads_right_and_masks_padding():
    examples = [Example([5, 6, 7], [M, 6, 7]), Example([8, 9], [M, 9])]
    batch = collate(examples, pad_token_id=0)
    assert set(batch) == {"input_ids", "labels", "attention_mask"}
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 9, 0]]
    assert batch["labels"].tolist() == [[M, 6, 7], [M, 9, M]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert all(tensor.dtype == torch.long for tensor in batch.values())


def test_collate_packed_gives_position_ids_and_no_attention_mask():
    examples = pack([_sample(3, 1), _sample(2, 2), _sample(4, 3)], seq_len=5, pad_token_id=0)
    batch = collate(examples, pad_token_id=0)
    assert set(batch) == {"input_ids", "labels", "position_ids"}
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]  # 3 + 2, then 4 + pad
    flat = flatten_packed(batch)
    assert flat["position_ids"].shape == (1, 10)
    with pytest.raises(ValueError, match="packed and unpacked"):
        collate([examples[0], _sample(2, 9)], pad_token_id=0)


def _tiny_llama(attn_implementation: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    config._attn_implementation = attn_implementation
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_packed_batch_gives_each_sample_the_logits_it_has_alone(attn_implementation):
    """Differential: a packed batch through a transformers model equals each sample run on its own."""
    model = _tiny_llama(attn_implementation)
    generator = torch.Generator().manual_seed(1)
    samples = []
    for tag, length in enumerate([7, 5, 3, 9, 6]):
        ids = torch.randint(1, 64, (length,), generator=generator).tolist()
        samples.append(Example(ids, [M] + ids[1:], None, f"s{tag}"))
    packed = pack(samples, seq_len=12, pad_token_id=0)
    batch = collate(packed, pad_token_id=0)
    with torch.no_grad():
        # use_cache=False: transformers derives the per-sample mask only when no KV cache is built
        packed_logits = model(**batch, use_cache=False).logits
        flat_logits = model(**flatten_packed(batch), use_cache=False).logits
        by_source = {s.source: s for s in samples}
        for row, sequence in enumerate(packed):
            start = 0
            for source in sequence.source.split(" + "):
                ids = by_source[source].input_ids
                alone = model(input_ids=torch.tensor([ids])).logits[0]
                span = slice(start, start + len(ids))
                torch.testing.assert_close(packed_logits[row, span], alone, atol=1e-5, rtol=1e-4)
                flat_span = slice(row * 12 + start, row * 12 + start + len(ids))
                torch.testing.assert_close(flat_logits[0, flat_span], alone, atol=1e-5, rtol=1e-4)
                start += len(ids)
