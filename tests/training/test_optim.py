"""Optimizers: paged AdamW equals torch AdamW bit for bit; 8-bit AdamW follows it closely."""

from __future__ import annotations

import pytest
import torch

from nibbletune.training.optim import AdamW8bit, PagedAdamW, dequantize_8bit, quantize_8bit
from nibbletune.training.schedule import lr_factor

SHAPES = [(300, 70), (5,), (4096, 3), (64, 64)]


def params_like(seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=generator)) for shape in SHAPES]


def run_steps(optimizer_factory, steps=6):
    params = params_like()
    optimizer = optimizer_factory(params)
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for param in params:
            param.grad = torch.randn(param.shape, generator=generator)
        optimizer.step()
    return params, optimizer


class CountingPagedAdamW(PagedAdamW):
    """Records the largest piece of moments held in memory between a read and its write-back."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.in_memory, self.largest = 0, 0

    def _read(self, offset, out):
        super()._read(offset, out)
        self.in_memory += out.numel() * 4
        self.largest = max(self.largest, self.in_memory)

    def _write(self, offset, values):
        super()._write(offset, values)
        self.in_memory -= values.numel() * 4


@pytest.mark.parametrize("budget_bytes", [8 * 1024, 8 * 3000, 64 * 2**20])
def test_paged_adamw_equals_adamw(budget_bytes, tmp_path):
    reference, torch_opt = run_steps(lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1, foreach=False))
    paged, paged_opt = run_steps(lambda p: CountingPagedAdamW(p, lr=1e-2, weight_decay=0.1,
                                                              budget_bytes=budget_bytes, directory=str(tmp_path)))
    for a, b in zip(reference, paged):
        assert torch.equal(a, b)
    budget = max(budget_bytes, 8 * 1024)  # the smallest piece is 1024 values of both moments
    assert paged_opt.resident_bytes <= budget
    assert 0 < paged_opt.largest <= budget and paged_opt.in_memory == 0
    if budget_bytes < 4096 * 3 * 8:
        assert paged_opt.largest < 4096 * 3 * 8  # the largest parameter's moments were split into pieces
    # Between steps only the step counters stay in memory; the moments live in the file.
    assert all(set(state) == {"step"} for state in paged_opt.state.values())
    expected, got = torch_opt.state_dict()["state"], paged_opt.state_dict()["state"]
    for index in expected:
        for name in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(expected[index][name], got[index][name])


def test_paged_adamw_state_round_trip(tmp_path):
    params, optimizer = run_steps(lambda p: PagedAdamW(p, lr=1e-2, budget_bytes=8 * 1024), steps=3)
    state = optimizer.state_dict()
    fresh = PagedAdamW(params, lr=1e-2, budget_bytes=8 * 1024)
    fresh.load_state_dict(state)
    for index, entry in fresh.state_dict()["state"].items():
        assert torch.equal(entry["exp_avg_sq"], state["state"][index]["exp_avg_sq"])


def test_adamw8bit_tracks_adamw():
    reference, _ = run_steps(lambda p: torch.optim.AdamW(p, lr=1e-2, foreach=False), steps=10)
    eight_bit, optimizer = run_steps(lambda p: AdamW8bit(p, lr=1e-2), steps=10)
    start = params_like()
    for a, b, s in zip(reference, eight_bit, start):
        moved = (a - s).norm()
        assert (a - b).norm() < 0.05 * moved
    big = optimizer.state[eight_bit[0]]
    assert big["exp_avg_codes"].dtype == torch.uint8 and "exp_avg" not in big
    assert "exp_avg" in optimizer.state[eight_bit[1]]  # small tensors keep float32 moments


def test_8bit_round_trip_error_bound():
    values = torch.randn(10_000, generator=torch.Generator().manual_seed(0))
    codes, absmax = quantize_8bit(values)
    restored = dequantize_8bit(codes, absmax, values.shape)
    assert ((restored - values).abs() <= 0.02 * absmax.repeat_interleave(256)[: values.numel()]).all()


def test_schedule_shapes():
    assert lr_factor(0, 100, 10, "cosine") == pytest.approx(1 / 11)
    assert lr_factor(10, 100, 10, "cosine") == 1.0
    assert lr_factor(55, 100, 10, "cosine") == pytest.approx(0.5)
    assert lr_factor(55, 100, 10, "linear") == pytest.approx(0.5)
    assert lr_factor(99, 100, 10, "constant") == 1.0
