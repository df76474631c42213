"""The scratch-buffer dequantization: same values as a fresh decode, one buffer per shape, reused."""

import threading

import pytest
import torch

from nibbletune.quant import quantize
from nibbletune.quant.scratch import dequantize_scratch, release_scratch, scratch_bytes


@pytest.fixture(autouse=True)
def _fresh_scratch():
    release_scratch()
    yield
    release_scratch()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(64, 128), (96, 200), (3, 64)])
def test_equals_a_fresh_decode(shape, dtype):
    torch.manual_seed(0)
    weight = quantize(torch.randn(shape), quant_type="nf4", blocksize=64, double_quant=True)
    assert torch.equal(dequantize_scratch(weight, dtype), weight.dequantize(dtype))


def test_one_buffer_per_shape_and_dtype_reused_by_every_weight():
    torch.manual_seed(0)
    first, second = (quantize(torch.randn(64, 128)) for _ in range(2))
    other_shape = quantize(torch.randn(128, 64))
    a = dequantize_scratch(first, torch.bfloat16)
    a_values = a.clone()
    b = dequantize_scratch(second, torch.bfloat16)
    assert b.data_ptr() == a.data_ptr()
    assert not torch.equal(b, a_values) and torch.equal(b, second.dequantize(torch.bfloat16))
    c = dequantize_scratch(other_shape, torch.bfloat16)
    d = dequantize_scratch(first, torch.float32)
    assert len({a.data_ptr(), c.data_ptr(), d.data_ptr()}) == 3
    assert scratch_bytes() == 64 * 128 * 2 * 2 + 64 * 128 * 4
    release_scratch()
    assert scratch_bytes() == 0


def test_threads_do_not_share_buffers():
    weight = quantize(torch.randn(64, 128))
    in_thread = []  # holds the thread's buffer alive, so its address cannot be reused below
    thread = threading.Thread(target=lambda: in_thread.append(dequantize_scratch(weight, torch.float32)))
    thread.start()
    thread.join()
    assert dequantize_scratch(weight, torch.float32).data_ptr() != in_thread[0].data_ptr()
