"""The fused LoRA op (LoraLinear's eager path) against autograd on a dense reference."""

import pytest
import torch
from lora_oracles import make_nf4, randomize_adapter, reference_weight
from torch import nn

from nibbletune.modules import LoraLinear
from nibbletune.modules.dropout import draw_seed, dropout_mask

TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (3e-2, 3e-2), torch.float16: (3e-3, 3e-3)}


def _layer(base_kind, compute_dtype, bias, dropout, in_features=96, out_features=40):
    if base_kind == "nf4":
        base = make_nf4(out_features, in_features, bias=bias, compute_dtype=compute_dtype)
    else:
        torch.manual_seed(0)
        base = nn.Linear(in_features, out_features, bias=bias).to(compute_dtype)
    layer = LoraLinear(base, r=4, alpha=12, dropout=dropout)
    randomize_adapter(layer)
    return layer.train()


def _reference(layer, x, seed_state):
    """x W^T + b + s * ((x * M) A^T) B^T by plain autograd, M drawn like the layer draws it."""
    base = layer.base
    dtype = base.compute_dtype if hasattr(base, "compute_dtype") else base.weight.dtype
    weight = reference_weight(base).to(dtype) if hasattr(base, "packed_codes") else base.weight.detach()
    A = layer.lora_A.weight.detach().clone().requires_grad_(True)
    B = layer.lora_B.weight.detach().clone().requires_grad_(True)
    torch.set_rng_state(seed_state)
    xa = x.float()
    p = layer.lora_dropout.p if isinstance(layer.lora_dropout, nn.Dropout) else 0.0
    if p:
        xa = xa * dropout_mask(xa.shape, p, draw_seed(), xa.dtype)
    bias = None if base.bias is None else base.bias.detach().to(dtype)
    y = torch.nn.functional.linear(x.to(dtype), weight, bias)
    y = y + ((xa @ A.t()) @ B.t() * layer.scaling).to(dtype)
    return y, A, B


@pytest.mark.parametrize("base_kind", ["nf4", "dense"])
@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dropout", [0.0, 0.25])
@pytest.mark.parametrize("batch", [(7,), (2, 5)])
def test_fused_matches_autograd_reference(base_kind, compute_dtype, dropout, batch):
    layer = _layer(base_kind, compute_dtype, bias=True, dropout=dropout)
    x = torch.randn(*batch, 96)
    x_ours, x_ref = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    state = torch.get_rng_state()
    y = layer(x_ours)
    assert type(y.grad_fn).__name__ == "LoraLinearFunctionBackward"
    y_ref, A, B = _reference(layer, x_ref, state)
    rtol, atol = TOL[compute_dtype]
    assert y.dtype == compute_dtype and y.shape == (*batch, 40)
    torch.testing.assert_close(y, y_ref, rtol=rtol, atol=atol)
    grad = torch.randn(y.shape).to(compute_dtype)
    y.backward(grad)
    y_ref.backward(grad)
    torch.testing.assert_close(x_ours.grad, x_ref.grad, rtol=rtol, atol=atol)
    torch.testing.assert_close(layer.lora_A.weight.grad, A.grad, rtol=rtol, atol=atol * 10)
    torch.testing.assert_close(layer.lora_B.weight.grad, B.grad, rtol=rtol, atol=atol * 10)
    assert x_ours.grad.dtype == torch.float32 and layer.lora_A.weight.grad.dtype == torch.float32


def test_eval_mode_has_no_dropout_and_is_deterministic():
    layer = _layer("nf4", torch.float32, bias=False, dropout=0.5).eval()
    x = torch.randn(3, 96)
    assert torch.equal(layer(x), layer(x))


def test_train_mode_dropout_changes_per_call():
    layer = _layer("nf4", torch.float32, bias=False, dropout=0.5)
    x = torch.randn(3, 96)
    assert not torch.equal(layer(x), layer(x))


def test_frozen_adapter_and_input_without_grad():
    layer = _layer("nf4", torch.float32, bias=True, dropout=0.1)
    layer.lora_A.weight.requires_grad_(False)
    x = torch.randn(4, 96, requires_grad=True)
    layer(x).sum().backward()
    assert layer.lora_A.weight.grad is None and layer.lora_B.weight.grad is not None and x.grad is not None
    layer.lora_A.weight.requires_grad_(True)
    layer(torch.randn(4, 96)).sum().backward()
    assert layer.lora_A.weight.grad is not None


@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpointing_replays_the_same_dropout_mask(reentrant):
    from torch.utils.checkpoint import checkpoint

    layer = _layer("nf4", torch.float32, bias=True, dropout=0.3, in_features=96, out_features=96)

    def grads(run):
        layer.zero_grad(set_to_none=True)
        x = torch.randn(2, 6, 96, generator=torch.Generator().manual_seed(5), requires_grad=True)
        torch.manual_seed(11)
        (run(x) ** 2).sum().backward()
        return [x.grad, layer.lora_A.weight.grad, layer.lora_B.weight.grad]

    plain = grads(lambda t: layer(layer(t)))
    checkpointed = grads(lambda t: checkpoint(lambda u: layer(layer(u)), t, use_reentrant=reentrant))
    for a, b in zip(plain, checkpointed):
        assert torch.equal(a, b)


def test_saves_only_packed_weight_and_small_activations():
    layer = _layer("nf4", torch.float32, bias=False, dropout=0.1, in_features=256, out_features=256)
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    x = torch.randn(8, 256, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x)
    sizes = sorted(tuple(t.shape) for t in saved if t is not None)
    assert (256, 256) not in sizes, "the dequantized weight must not be kept for backward"
    assert max(t.numel() for t in saved if t is not None) <= 256 * 256 // 2  # packed codes: half a byte each


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_backward_under_autocast(dtype):
    layer = _layer("nf4", torch.float32, bias=True, dropout=0.1)
    x = torch.randn(2, 5, 96, requires_grad=True)
    state = torch.get_rng_state()
    with torch.autocast("cpu", dtype=dtype):
        y = layer(x)
    y.float().sum().backward()
    grads = [x.grad.clone(), layer.lora_A.weight.grad.clone(), layer.lora_B.weight.grad.clone()]
    layer.zero_grad(set_to_none=True)
    x.grad = None
    torch.set_rng_state(state)
    layer(x).sum().backward()
    for got, want in zip(grads, [x.grad, layer.lora_A.weight.grad, layer.lora_B.weight.grad]):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=5e-2, atol=5e-2)
