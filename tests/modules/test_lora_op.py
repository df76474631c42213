"""The LoRA custom ops (what torch.compile sees) against the eager autograd Function, and torch's opcheck."""

import pytest
import torch
from lora_oracles import make_nf4, randomize_adapter
from torch import nn

from nibbletune.modules import LoraLinear
from nibbletune.modules.lora_function import LoraLinearFunction, LoraSpec
from nibbletune.modules.lora_op import lora_linear, lora_linear_op

pytestmark = pytest.mark.usefixtures("single_thread")

SEED = 0xF234_5678_9ABC_DEF0  # the high bit set: the signed int64 tensor must map back


def _layer(base_kind, compute_dtype, bias, in_features=80, out_features=48):
    if base_kind == "nf4":
        base = make_nf4(out_features, in_features, bias=bias, compute_dtype=compute_dtype)
    else:
        torch.manual_seed(0)
        base = nn.Linear(in_features, out_features, bias=bias).to(compute_dtype)
    layer = LoraLinear(base, r=4, alpha=12, dropout=0.25)
    randomize_adapter(layer)
    return layer


def _weight_and_bias(layer):
    base = layer.base
    if hasattr(base, "quantized_weight"):
        bias = None if base.bias is None else base.bias.to(base.compute_dtype)
        return base.quantized_weight, bias, base.compute_dtype
    return base.weight, base.bias, base.weight.dtype


def _grads(fn, x, layer, grad):
    x = x.clone().requires_grad_(True)
    for p in (layer.lora_A.weight, layer.lora_B.weight):
        p.grad = None
    y = fn(x)
    y.backward(grad)
    return y.detach(), x.grad, layer.lora_A.weight.grad.clone(), layer.lora_B.weight.grad.clone()


@pytest.mark.parametrize("base_kind", ["nf4", "dense"])
@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dropout", [0.0, 0.25])
@pytest.mark.parametrize("bias", [False, True])
def test_custom_op_equals_eager_function(base_kind, compute_dtype, dropout, bias):
    """Same formulas, same seed, same dropout mask: the op's outputs and gradients equal the Function's bitwise."""
    layer = _layer(base_kind, compute_dtype, bias)
    weight, bias_tensor, dtype = _weight_and_bias(layer)
    spec = LoraSpec(layer.scaling, dropout, SEED if dropout else 0, dtype)
    seed = torch.tensor(SEED - (1 << 64) if dropout else 0, dtype=torch.int64)  # the op takes it as a signed int64
    x = torch.randn(3, 5, 80)
    grad = torch.randn(3, 5, 48).to(dtype)
    A, B = layer.lora_A.weight, layer.lora_B.weight
    eager = _grads(lambda x: LoraLinearFunction.apply(x, bias_tensor, A, B, spec, weight), x, layer, grad)
    op = _grads(lambda x: lora_linear(x, bias_tensor, A, B, spec, layer.base, seed), x, layer, grad)
    for ours, theirs in zip(op, eager):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


@pytest.mark.parametrize("base_kind", ["nf4", "dense"])
def test_opcheck(base_kind):
    """torch.library.opcheck: schema, fake (meta) kernel and autograd registration agree with the real op."""
    layer = _layer(base_kind, torch.float32, bias=True)
    weight, bias, dtype = _weight_and_bias(layer)
    if base_kind == "nf4":
        storage, layout, offset = layer.base.traceable_weight()
        extra = (list(layout.shape), layout.dtype, layout.blocksize, layout.quant_type, offset)
    else:
        storage, extra = [weight], (list(weight.shape), weight.dtype, 0, "dense", None)
    x = torch.randn(6, 80, requires_grad=True)
    args = (x, bias, layer.lora_A.weight, layer.lora_B.weight, storage, *extra, layer.scaling, 0.25,
            torch.tensor(7, dtype=torch.int64), dtype)
    torch.library.opcheck(lora_linear_op, args)


@pytest.mark.parametrize("with_lora", [False, True])
def test_compiled_layers_share_one_graph_and_match_eager(with_lora):
    """Three 4-bit layers with different double-quant offsets: one compiled graph, eager's outputs and gradients."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    layers = []
    for seed in range(3):
        base = make_nf4(48, 80, bias=True, seed=seed)
        layer = LoraLinear(base, r=4, alpha=8) if with_lora else base
        if with_lora:
            randomize_adapter(layer, seed=seed)
        layers.append(layer)
    assert len({layer.base._layout.nested_offset if with_lora else layer._layout.nested_offset
                for layer in layers}) == 3
    x = torch.randn(2, 5, 80)
    frames_after_one = 0
    for layer in layers:
        eager_x, compiled_x = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        eager_y = layer(eager_x)
        eager_y.sum().backward()
        layer.compile(backend=counter)
        compiled_y = layer(compiled_x)
        compiled_y.sum().backward()
        layer._compiled_call_impl = None
        frames_after_one = frames_after_one or counter.frame_count
        torch.testing.assert_close(compiled_y, eager_y, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(compiled_x.grad, eager_x.grad, rtol=1e-6, atol=1e-6)
    assert counter.frame_count == frames_after_one  # the offsets reach the graph as tensors: no graph per layer
