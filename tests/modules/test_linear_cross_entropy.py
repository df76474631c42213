"""The fused head + cross-entropy against the plain logits path: values, gradients, memory, softcap."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from nibbletune.modules.linear_cross_entropy import IGNORE_INDEX, linear_cross_entropy_sum
from numerics import rounding_tolerance


def _reference(hidden, weight, targets, softcap):
    logits = (hidden @ weight.t()).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return torch.nn.functional.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")


def _case(n, h, v, dtype, seed, ignored=0.3):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=generator).to(dtype).requires_grad_(True)
    weight = (torch.randn(v, h, generator=generator) * 0.3).to(dtype).requires_grad_(True)
    targets = torch.randint(0, v, (n,), generator=generator)
    targets[torch.rand(n, generator=generator) < ignored] = IGNORE_INDEX
    return hidden, weight, targets


def _both(hidden, weight, targets, softcap, chunk):
    loss = linear_cross_entropy_sum(hidden, weight, targets, softcap, chunk_elements=chunk)
    grads = torch.autograd.grad(loss * 0.5, [hidden, weight])  # a non-unit incoming gradient
    ref = _reference(hidden, weight, targets, softcap)
    ref_grads = torch.autograd.grad(ref * 0.5, [hidden, weight])
    return (loss, *grads), (ref, *ref_grads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("softcap", [None, 30.0, 2.0])
@pytest.mark.parametrize("shape", [(1, 8, 11), (37, 16, 101), (300, 32, 1000)])
@pytest.mark.parametrize("chunk_rows", [1, 7, 10_000])
def test_equals_the_plain_loss_and_gradients(dtype, softcap, shape, chunk_rows):
    """The same float32 log-softmax of the same matmul: equal up to the order of a sum of n terms.

    Loss: a sum over up to n trained tokens of float32 values, chunked or not: n float32 roundings.
    Gradients: each row is computed by the same ops from the same operands, but the matmul may block
    its inner sum (over v for dL/dh, over n for dL/dW) differently for another number of rows: up
    to that many float32 roundings in its accumulator, plus the final rounding to the compute dtype.
    """
    n, h, v = shape
    hidden, weight, targets = _case(n, h, v, dtype, seed=n * h + v)
    (loss, grad_h, grad_w), (ref, ref_h, ref_w) = _both(hidden, weight, targets, softcap, chunk_rows * v)
    assert abs(float(loss) - float(ref)) <= rounding_tolerance(torch.float32, ref, n) + 1e-6
    bound_h = rounding_tolerance(dtype, ref_h, 2) + rounding_tolerance(torch.float32, ref_h, v)
    torch.testing.assert_close(grad_h.float(), ref_h.float(), atol=bound_h, rtol=0)
    bound_w = rounding_tolerance(dtype, ref_w, 2) + rounding_tolerance(torch.float32, ref_w, n)
    torch.testing.assert_close(grad_w.float(), ref_w.float(), atol=bound_w, rtol=0)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 40), v=st.integers(2, 60), ignored=st.floats(0, 1), chunk_rows=st.integers(1, 50),
       softcap=st.sampled_from([None, 5.0]))
def test_property_any_mask_and_chunk(n, v, ignored, chunk_rows, softcap):
    hidden, weight, targets = _case(n, 8, v, torch.float32, seed=n * 131 + v, ignored=ignored)
    (loss, grad_h, grad_w), (ref, ref_h, ref_w) = _both(hidden, weight, targets, softcap, chunk_rows * v)
    torch.testing.assert_close(loss, ref, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(grad_h, ref_h, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(grad_w, ref_w, atol=1e-5, rtol=1e-4)
    assert torch.all(grad_h[targets == IGNORE_INDEX] == 0)  # untrained positions get no gradient


class _LargestOutput(TorchDispatchMode):
    """Records the largest tensor any op produces (numel)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(value, torch.Tensor):
                self.largest = max(self.largest, value.numel())
        return out


def test_never_builds_the_full_logits():
    hidden, weight, targets = _case(512, 16, 4000, torch.float32, seed=3, ignored=0.0)
    chunk = 64 * 4000  # 64 tokens' logits
    with _LargestOutput() as fused:
        loss = linear_cross_entropy_sum(hidden, weight, targets, chunk_elements=chunk)
        loss.backward()
    with _LargestOutput() as plain:
        _reference(hidden.detach().requires_grad_(True), weight, targets, None).backward()
    assert plain.largest >= 512 * 4000  # the plain path holds [tokens, vocab]
    assert fused.largest <= chunk  # the fused one a chunk of it at most


def test_frozen_weight_gets_no_gradient_and_no_grad_mode_is_a_plain_value():
    hidden, weight, targets = _case(20, 8, 30, torch.float32, seed=5)
    weight = weight.detach()
    loss = linear_cross_entropy_sum(hidden, weight, targets)
    (grad_h,) = torch.autograd.grad(loss, [hidden])
    assert grad_h.shape == hidden.shape and weight.grad is None
    with torch.no_grad():
        assert torch.allclose(linear_cross_entropy_sum(hidden, weight, targets), _reference(hidden, weight, targets, None))
