"""LoraLinear against PEFT on bitsandbytes Linear4bit and against a pure-torch reference."""

import math

import pytest
import torch
from lora_oracles import (
    make_nf4,
    our_grads,
    peft_grads,
    peft_twin,
    randomize_adapter,
    reference_lora_forward,
)
from torch import nn

from nibbletune.errors import NibbletuneError
from nibbletune.modules import LinearNF4, LoraLinear
from nibbletune.modules.dropout import draw_seed, dropout_mask

# bf16 tolerance: one bf16 rounding of values of order 1, and gradients summed over a few rows.
PEFT_TOL = {torch.float32: (1e-4, 1e-5), torch.bfloat16: (2e-2, 2e-2), torch.float16: (2e-3, 2e-3)}

VARIANTS = {
    "lora": dict(),
    "rslora": dict(use_rslora=True),
    "dora": dict(use_dora=True),
    "dora_rslora": dict(use_dora=True, use_rslora=True),
}


def _lora(out_features=64, in_features=128, dtype=torch.float32, bias=True, **kwargs) -> LoraLinear:
    layer = LoraLinear(make_nf4(out_features, in_features, bias=bias, compute_dtype=dtype), r=8, alpha=16, **kwargs)
    randomize_adapter(layer)
    return layer


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch", [(6,), (2, 5)])
def test_matches_peft_on_bnb_linear4bit(variant, dtype, batch):
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("peft")
    ours = _lora(dtype=dtype, **VARIANTS[variant])
    model, theirs = peft_twin(ours)
    x = torch.randn(*batch, 128)
    x_ours, x_peft = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y_ours, y_peft = ours(x_ours), model(x_peft.to(dtype))
    assert y_ours.dtype == dtype
    rtol, atol = PEFT_TOL[dtype]
    torch.testing.assert_close(y_ours, y_peft.to(dtype), rtol=rtol, atol=atol)
    grad = torch.randn(y_ours.shape).to(dtype)
    y_ours.backward(grad)
    y_peft.backward(grad.to(y_peft.dtype))
    torch.testing.assert_close(x_ours.grad, x_peft.grad.float(), rtol=rtol, atol=atol)
    ours_g, peft_g = our_grads(ours), peft_grads(theirs)
    assert sorted(ours_g) == sorted(peft_g)
    for name in ours_g:
        scale = peft_g[name].abs().max().item()
        torch.testing.assert_close(ours_g[name], peft_g[name], rtol=rtol, atol=atol * max(1.0, scale), msg=name)
    assert ours.base.packed_codes.grad is None and ours.base.bias.grad is None


@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_fresh_adapter_matches_peft_init(variant):
    pytest.importorskip("peft")
    layer = LoraLinear(make_nf4(64, 128), r=8, alpha=16, **VARIANTS[variant])
    assert torch.count_nonzero(layer.lora_B.weight) == 0
    bound = 1 / math.sqrt(128)  # kaiming_uniform_(a=sqrt(5)) on fan_in 128
    assert layer.lora_A.weight.abs().max() <= bound
    x = torch.randn(4, 128)
    torch.testing.assert_close(layer(x), layer.base(x), rtol=1e-6, atol=1e-6)
    if variant == "dora":
        _, theirs = peft_twin(layer)  # PEFT computes its own magnitude at init
        torch.testing.assert_close(layer.lora_magnitude_vector, theirs.lora_magnitude_vector["default"].weight)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("shape", [(37, 100), (64, 129), (48, 64)])
@pytest.mark.parametrize("batch", [(3,), (2, 4)])
def test_matches_pure_torch_reference_float32(variant, shape, batch):
    ours = _lora(*shape, **VARIANTS[variant])
    x = torch.randn(*batch, shape[1])
    x_ours, x_ref = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y = ours(x_ours)
    ref_layer = _lora(*shape, **VARIANTS[variant])  # same seeds, separate parameters for the reference grads
    y_ref = reference_lora_forward(ref_layer, x_ref)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(y)
    y.backward(grad)
    y_ref.backward(grad)
    torch.testing.assert_close(x_ours.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    for name, value in our_grads(ours).items():
        torch.testing.assert_close(value, our_grads(ref_layer)[name], rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_compute_dtypes(dtype):
    ours = _lora(37, 100, dtype=dtype, use_dora=True)
    x = torch.randn(2, 3, 100, requires_grad=True)
    y = ours(x)
    assert y.dtype == dtype and ours.lora_A.weight.dtype == torch.float32
    ref = reference_lora_forward(ours, x)
    torch.testing.assert_close(y.float(), ref, rtol=3e-2, atol=3e-2)
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and ours.lora_A.weight.grad.dtype == torch.float32


class HashedDropout(nn.Module):
    """nn.Dropout's role with nibbletune's mask, drawing its seed exactly as LoraLinear does."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x):
        return x * dropout_mask(x.shape, self.p, draw_seed(), x.dtype, x.device) if self.training else x


@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_dropout_matches_peft(variant):
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("peft")
    ours = _lora(dropout=0.3, **VARIANTS[variant])
    model, theirs = peft_twin(ours)
    theirs.lora_dropout["default"] = HashedDropout(0.3)  # PEFT's layer math with our dropout mask
    ours.train(), model.train()
    x = torch.randn(4, 128)
    torch.manual_seed(7)
    y_ours = ours(x)
    torch.manual_seed(7)
    y_peft = model(x)
    torch.testing.assert_close(y_ours, y_peft, rtol=1e-4, atol=1e-5)
    y_ours.sum().backward()
    y_peft.sum().backward()
    for name, value in our_grads(ours).items():
        torch.testing.assert_close(value, peft_grads(theirs)[name], rtol=1e-4, atol=1e-4, msg=name)


def test_scaling():
    assert LoraLinear(make_nf4(16, 64), r=4, alpha=8).scaling == 2.0
    assert LoraLinear(make_nf4(16, 64), r=4, alpha=8, use_rslora=True).scaling == 4.0


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_merged_weight_reproduces_forward_and_is_pure(variant):
    ours = _lora(bias=True, **VARIANTS[variant])
    packed_before = ours.base.packed_codes.clone()
    merged = ours.merged_weight(torch.float32)
    x = torch.randn(5, 128)
    torch.testing.assert_close(x @ merged.T + ours.base.bias, ours(x), rtol=1e-5, atol=1e-5)
    assert torch.equal(ours.base.packed_codes, packed_before)
    assert ours.merged_weight(torch.bfloat16).dtype == torch.bfloat16
    assert not merged.requires_grad


def test_nn_linear_base_and_adapter_dtype():
    base = nn.Linear(32, 16).to(torch.bfloat16)
    layer = LoraLinear(base, r=4, alpha=4, dtype=torch.bfloat16)
    assert layer.lora_A.weight.dtype == torch.bfloat16 and not base.weight.requires_grad
    randomize_adapter(layer)
    x = torch.randn(3, 32)
    expected = x.bfloat16() @ layer.merged_weight(torch.float32).bfloat16().T + base.bias
    torch.testing.assert_close(layer(x), expected, rtol=3e-2, atol=3e-2)


def test_rejects_bad_arguments():
    with pytest.raises(NibbletuneError):
        LoraLinear(nn.Conv1d(3, 3, 1), r=4, alpha=4)
    with pytest.raises(NibbletuneError):
        LoraLinear(make_nf4(16, 64), r=0, alpha=4)
    with pytest.raises(NibbletuneError):
        LoraLinear(make_nf4(16, 64), r=4, alpha=4, init="pissa")
    with pytest.raises(NibbletuneError, match="full-precision"):
        LoraLinear(make_nf4(16, 64), r=4, alpha=4, init="loftq")


class _Block(nn.Module):
    def __init__(self, use_dora=False):
        super().__init__()
        self.up = _lora(64, 128, use_dora=use_dora)
        self.down = _lora(128, 64, use_dora=use_dora)

    def forward(self, x):
        return self.down(torch.nn.functional.gelu(self.up(x)))


@pytest.mark.parametrize("use_dora", [False, True])
def test_gradient_checkpointing_gives_equal_grads(use_dora):
    from torch.utils.checkpoint import checkpoint

    block = _Block(use_dora)
    x = torch.randn(2, 3, 128)

    def grads(run):
        block.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(True)
        run(xi).pow(2).sum().backward()
        return [xi.grad] + [p.grad for p in block.parameters() if p.requires_grad]

    plain = grads(block)
    for reentrant in (False, True):
        checkpointed = grads(lambda t: checkpoint(block, t, use_reentrant=reentrant))
        for a, b in zip(plain, checkpointed):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_linear_has_no_graph_break_under_dynamo():
    import torch._dynamo

    torch._dynamo.reset()
    layer = _lora(64, 128)
    x = torch.randn(2, 128)
    explanation = torch._dynamo.explain(layer.base)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    for variant in VARIANTS.values():
        explanation = torch._dynamo.explain(_lora(64, 128, **variant))(x)
        assert explanation.graph_break_count == 0, explanation.break_reasons


@pytest.mark.parametrize("use_dora", [False, True])
def test_torch_compile_fullgraph_matches_eager(use_dora):
    import torch._dynamo

    torch._dynamo.reset()
    block = _Block(use_dora)
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    x = torch.randn(2, 3, 128)
    x_eager, x_compiled = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y_eager = block(x_eager)
    eager_grads = torch.autograd.grad(y_eager.sum(), [x_eager] + [p for p in block.parameters() if p.requires_grad])
    y_compiled = compiled(x_compiled)
    compiled_grads = torch.autograd.grad(y_compiled.sum(), [x_compiled] + [p for p in block.parameters() if p.requires_grad])
    torch.testing.assert_close(y_compiled, y_eager, rtol=1e-5, atol=1e-5)
    for a, b in zip(eager_grads, compiled_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_torch_compile_inductor_linear():
    """One inductor compile of the bare 4-bit linear (the C++ backend is slow on CPU: keep it tiny)."""
    import torch._dynamo

    torch._dynamo.reset()
    layer = make_nf4(32, 64)
    x = torch.randn(2, 64, requires_grad=True)
    compiled = torch.compile(layer, fullgraph=True)
    y = compiled(x)
    torch.testing.assert_close(y, layer(x), rtol=1e-5, atol=1e-5)
    (g,) = torch.autograd.grad(y.sum(), x)
    (g_ref,) = torch.autograd.grad(layer(x).sum(), x)
    torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-5)


def test_module_to_moves_buffers_and_keeps_adapter_dtype():
    layer = _lora(use_dora=True)
    layer.to("cpu")
    assert isinstance(layer.base, LinearNF4) and layer.lora_magnitude_vector.dtype == torch.float32
