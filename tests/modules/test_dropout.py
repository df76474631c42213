"""Hashed dropout: C kernel vs pure-torch twin, statistics, thread and seed behaviour."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nibbletune.modules import dropout
from nibbletune.modules.dropout import (
    draw_seed,
    dropout_mask,
    dropout_mask_reference,
    dropout_threshold,
    keep_scale,
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def test_kernel_is_built_here():
    assert dropout._get_library() is not None, "the C compiler is on every machine here"


@settings(max_examples=60, deadline=None)
@given(numel=st.integers(0, 5000), p=st.floats(0.0, 0.99), seed=st.integers(0, 2**64 - 1),
       dtype=st.sampled_from(DTYPES))
def test_kernel_equals_reference(numel, p, seed, dtype):
    assert torch.equal(dropout_mask((numel,), p, seed, dtype), dropout_mask_reference((numel,), p, seed, dtype))


@pytest.mark.parametrize("shape", [(1,), (2,), (3, 5, 7), (1024, 1408), (33, 16385 * 2 + 1)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_equals_reference_on_large_and_odd_shapes(shape, dtype):
    seed = 0xDEADBEEF12345678
    assert torch.equal(dropout_mask(shape, 0.1, seed, dtype), dropout_mask_reference(shape, 0.1, seed, dtype))


def test_pinned_values_guard_the_definition():
    """A change of the hash would silently change every run's dropout: pin a few bits."""
    mask = dropout_mask_reference((16,), 0.5, 42, torch.float32)
    assert (mask != 0).int().tolist() == PINNED_KEEP_42


PINNED_KEEP_42 = [int(v) for v in "1000101010110110"]


def test_same_bits_for_any_thread_count():
    seed, shape = 7, (300, 1000)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = dropout_mask(shape, 0.2, seed, torch.float32)
        torch.set_num_threads(max(2, before))
        assert torch.equal(single, dropout_mask(shape, 0.2, seed, torch.float32))
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5, 0.9])
def test_drop_rate_and_unbiased_scale(p):
    mask = dropout_mask((2000, 1000), p, 123, torch.float32)
    dropped = (mask == 0).double().mean().item()
    sigma = math.sqrt(p * (1 - p) / mask.numel())
    assert abs(dropped - dropout_threshold(p) / 65536) < 6 * sigma
    assert mask.unique().tolist() == [0.0, pytest.approx(keep_scale(p), rel=1e-6)]
    assert abs(mask.double().mean().item() - 1.0) < 6 * sigma * keep_scale(p)


def test_neighbouring_elements_and_seeds_are_uncorrelated():
    a = (dropout_mask((1_000_000,), 0.5, 1, torch.float32) != 0).double()
    b = (dropout_mask((1_000_000,), 0.5, 2, torch.float32) != 0).double()
    for x, y in [(a[:-1], a[1:]), (a[::2], a[1::2]), (a, b)]:
        assert abs(torch.corrcoef(torch.stack([x, y]))[0, 1].item()) < 0.01


def test_seed_follows_torch_manual_seed():
    torch.manual_seed(3)
    first = [draw_seed() for _ in range(3)]
    torch.manual_seed(3)
    assert [draw_seed() for _ in range(3)] == first
    assert len(set(first)) == 3 and all(0 <= s < 2**64 for s in first)


def test_fallback_without_kernels(monkeypatch):
    monkeypatch.setenv("NIBBLETUNE_NO_KERNELS", "1")
    monkeypatch.setattr(dropout, "_get_library", lambda: pytest.fail("kernel used although disabled"))
    assert torch.equal(dropout_mask((9,), 0.3, 5, torch.float32), dropout_mask_reference((9,), 0.3, 5, torch.float32))


def test_probability_is_checked():
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        dropout_threshold(1.0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("numel", [1, 7, 40_001])
def test_fused_apply_and_accumulate_equal_mask_arithmetic(dtype, numel):
    from nibbletune.modules.dropout import accumulate_dropout_grad, apply_dropout

    x = torch.randn(numel).to(dtype)
    x[0] = float("-inf") if numel > 1 else x[0]
    mask = dropout_mask_reference((numel,), 0.3, 99, dtype)
    assert torch.equal(apply_dropout(x, 0.3, 99), x * mask)
    assert torch.equal(apply_dropout(x, 0.3, 99).isnan(), (x * mask).isnan())
    acc = torch.randn(numel).to(dtype)
    expected = (acc.float() + x.float() * mask.float()).to(dtype)  # one rounding, as addcmul_
    accumulate_dropout_grad(acc, x, 0.3, 99)
    torch.testing.assert_close(acc, expected, equal_nan=True, rtol=0, atol=0)
