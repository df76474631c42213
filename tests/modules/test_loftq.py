"""LoftQ initialisation: lower error than plain quantization, and alpha / r honoured."""

import pytest
import torch
from torch import nn

from nibbletune.errors import NibbletuneError
from nibbletune.modules import LinearNF4, LoraLinear, loftq_init
from nibbletune.quant import quantize


def _weight(out_features=96, in_features=128, seed=0):
    torch.manual_seed(seed)
    # a trained-looking weight: some low-rank structure plus noise
    low_rank = torch.randn(out_features, 4) @ torch.randn(4, in_features) * 0.05
    return low_rank + torch.randn(out_features, in_features) * 0.02


@pytest.mark.parametrize("num_iters", [1, 3])
def test_error_is_lower_than_plain_quantization(num_iters):
    weight = _weight()
    plain_error = torch.linalg.norm(weight - quantize(weight).dequantize(torch.float32))
    qt, lora_A, lora_B = loftq_init(weight, r=8, scaling=2.0, num_iters=num_iters)
    approx = qt.dequantize(torch.float32) + 2.0 * lora_B @ lora_A
    loftq_error = torch.linalg.norm(weight - approx)
    assert loftq_error < 0.9 * plain_error, (loftq_error, plain_error)
    assert lora_A.shape == (8, 128) and lora_B.shape == (96, 8)


def test_more_iterations_do_not_hurt():
    weight = _weight(seed=1)
    errors = []
    for num_iters in (1, 4):
        qt, lora_A, lora_B = loftq_init(weight, r=8, scaling=1.0, num_iters=num_iters)
        errors.append(torch.linalg.norm(weight - qt.dequantize(torch.float32) - lora_B @ lora_A))
    assert errors[1] <= errors[0] * 1.01


def test_scaling_is_honoured():
    weight = _weight()
    effective = []
    for scaling in (0.5, 2.0, 16.0):
        qt, lora_A, lora_B = loftq_init(weight, r=8, scaling=scaling)
        effective.append(scaling * lora_B @ lora_A)
        assert torch.equal(qt.packed, loftq_init(weight, r=8, scaling=1.0)[0].packed)
    for delta in effective[1:]:
        torch.testing.assert_close(delta, effective[0], rtol=1e-4, atol=1e-6)


def test_lora_linear_loftq_init_from_full_precision_linear():
    torch.manual_seed(0)
    linear = nn.Linear(128, 96)
    with torch.no_grad():
        linear.weight.copy_(_weight())
    x = torch.randn(16, 128)
    exact = linear(x)
    plain = LoraLinear(LinearNF4.from_linear(linear), r=8, alpha=32)
    loftq = LoraLinear(linear, r=8, alpha=32, init="loftq", loftq_iters=2)
    assert isinstance(loftq.base, LinearNF4) and loftq.scaling == 4.0
    assert torch.linalg.norm(loftq(x) - exact) < 0.9 * torch.linalg.norm(plain(x) - exact)
    torch.testing.assert_close(loftq.merged_weight(), loftq.base.dequantized_weight(torch.float32)
                               + loftq.scaling * loftq.lora_B.weight @ loftq.lora_A.weight)


def test_loftq_rejects_bad_input():
    with pytest.raises(NibbletuneError, match="rank"):
        loftq_init(torch.randn(4, 64), r=8, scaling=1.0)
    with pytest.raises(NibbletuneError, match="2-D"):
        loftq_init(torch.randn(64), r=1, scaling=1.0)
