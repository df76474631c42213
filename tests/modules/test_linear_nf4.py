"""LinearNF4: forward/backward against a pure-torch reference and bitsandbytes, state-dict layout."""

import pytest
import torch
import torch.nn.functional as F
from lora_oracles import bnb_linear4bit, make_nf4, reference_weight
from torch import nn

from nibbletune.errors import FormatError
from nibbletune.modules import LinearNF4
from nibbletune.quant import quantize

TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(48, 96), (37, 100), (64, 129)])  # odd widths: partial last block
@pytest.mark.parametrize("batch", [(5,), (2, 3)])
def test_forward_backward_match_reference(dtype, shape, batch):
    out_features, in_features = shape
    layer = make_nf4(out_features, in_features, compute_dtype=dtype)
    weight = reference_weight(layer)
    x = torch.randn(*batch, in_features, requires_grad=True)
    y = layer(x)
    assert y.dtype == dtype and y.shape == (*batch, out_features)
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = F.linear(x_ref.to(dtype), weight.to(dtype), layer.bias.to(dtype))
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(y, y_ref, rtol=rtol, atol=atol)
    grad = torch.randn_like(y)
    y.backward(grad)
    y_ref.backward(grad)
    assert x.grad.dtype == torch.float32
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=rtol, atol=atol)


def test_float32_is_exact_against_reference():
    layer = make_nf4(40, 70, compute_dtype=torch.float32)
    x = torch.randn(3, 70, dtype=torch.float64).float()
    expected = x @ reference_weight(layer).T + layer.bias
    torch.testing.assert_close(layer(x), expected, rtol=1e-6, atol=1e-6)


def test_frozen_weight_gets_no_grad_and_bias_grad_works():
    layer = make_nf4(32, 64)
    assert not any(p.requires_grad for p in layer.parameters())
    assert [name for name, _ in layer.named_parameters()] == ["bias"]
    layer.bias.requires_grad_(True)
    x = torch.randn(2, 4, 64, requires_grad=True)
    layer(x).sum().backward()
    torch.testing.assert_close(layer.bias.grad, torch.full((32,), 8.0))
    for buffer in layer.buffers():
        assert buffer.grad is None


def test_backward_saves_packed_weight_not_a_dequantized_copy():
    layer = make_nf4(64, 128)
    saved = []

    def pack(t):
        saved.append((t.dtype, tuple(t.shape)))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(torch.randn(4, 128, requires_grad=True))
    assert (torch.uint8, (64 * 128 // 2, 1)) in saved
    assert all(shape != (64, 128) for _, shape in saved)


@pytest.mark.parametrize("double_quant", [True, False])
def test_state_dict_is_bitsandbytes_layout(double_quant):
    pytest.importorskip("bitsandbytes")
    layer = make_nf4(64, 128, double_quant=double_quant)
    ref = bnb_linear4bit(layer)
    ours, theirs = layer.state_dict(), ref.state_dict()
    assert sorted(ours) == sorted(theirs)
    for key in ours:
        assert torch.equal(ours[key].cpu(), theirs[key].cpu()), key


def test_bitsandbytes_output_matches():
    pytest.importorskip("bitsandbytes")
    for dtype in (torch.float32, torch.bfloat16):
        layer = make_nf4(64, 128, compute_dtype=dtype)
        ref = bnb_linear4bit(layer)
        x = torch.randn(2, 3, 128)
        rtol, atol = TOL[dtype]
        torch.testing.assert_close(layer(x), ref(x.to(dtype)).to(dtype), rtol=rtol, atol=atol)


def test_load_state_dict_round_trip_replaces_quant_config():
    source = make_nf4(32, 64, double_quant=True, seed=3)
    target = make_nf4(32, 64, double_quant=False, seed=4)
    target.load_state_dict(source.state_dict())
    assert target.nested_absmax is not None
    x = torch.randn(5, 64)
    assert torch.equal(target(x), source(x))


def test_load_state_dict_errors():
    layer = make_nf4(32, 64)
    with pytest.raises(FormatError, match="shape"):
        layer.load_state_dict(make_nf4(16, 64).state_dict())
    with pytest.raises(RuntimeError, match="not a 4-bit weight"):
        layer.load_state_dict({"weight": torch.zeros(32, 64), "bias": torch.zeros(32)})
    with pytest.raises(RuntimeError, match="Missing key"):
        layer.load_state_dict({"bias": torch.zeros(32)})


def test_to_dtype_never_casts_the_quantized_buffers():
    layer = make_nf4(32, 64, double_quant=False)
    before = layer(torch.ones(1, 64))
    layer.to(torch.float16)
    assert layer.absmax.dtype == torch.float32 and layer.bias.dtype == torch.float16
    layer.compute_dtype = torch.float32
    torch.testing.assert_close(layer(torch.ones(1, 64)), before, rtol=1e-3, atol=1e-3)
    layer.to("cpu")
    assert layer.quantized_weight.packed.data_ptr() == layer.packed_codes.data_ptr()


def test_from_linear_keeps_dtype_and_bias():
    linear = nn.Linear(64, 16).to(torch.bfloat16)
    layer = LinearNF4.from_linear(linear)
    assert layer.compute_dtype == torch.bfloat16 and layer.quantized_weight.dtype == torch.bfloat16
    assert torch.equal(layer.bias, linear.bias)
    assert torch.equal(layer.quantized_weight.packed, quantize(linear.weight.detach()).packed)


def test_works_under_gradient_checkpointing():
    from torch.utils.checkpoint import checkpoint

    layer = make_nf4(64, 64)
    x = torch.randn(3, 64, requires_grad=True)
    (layer(layer(x)) ** 2).sum().backward()
    expected, x.grad = x.grad, None
    for reentrant in (False, True):
        (checkpoint(lambda t: layer(layer(t)), x, use_reentrant=reentrant) ** 2).sum().backward()
        torch.testing.assert_close(x.grad, expected, rtol=0, atol=0)
        x.grad = None
