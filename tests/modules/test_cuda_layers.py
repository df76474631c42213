"""The 4-bit layer, LoRA and quantization on a real GPU against the CPU path (skipped without CUDA).

Run by `benchmarks/gpu_check.sh` (`pytest -m gpu`); on a CPU-only machine every test skips.
"""

import pytest
import torch
from lora_oracles import make_nf4, randomize_adapter

from nibbletune.modules import LoraLinear
from nibbletune.quant.tensor import quantize

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def needs_cuda(monkeypatch):
    """Skip without CUDA; compile the Triton kernel for real rather than interpreting it."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int4"])
@pytest.mark.parametrize("shape", [(4096, 1024), (333, 777), (12345,)])
def test_quantize_on_cuda_writes_the_cpu_bytes(quant_type, shape):
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    on_cpu = quantize(weight, quant_type, 64, True)
    on_cuda = quantize(weight.cuda(), quant_type, 64, True).to("cpu")
    assert torch.equal(on_cpu.packed, on_cuda.packed)
    assert torch.equal(on_cpu.absmax, on_cuda.absmax)


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("use_dora", [False, True])
def test_lora_layer_on_cuda_matches_cpu(compute_dtype, use_dora):
    layer = LoraLinear(make_nf4(256, 512, compute_dtype=compute_dtype), r=8, alpha=16, use_dora=use_dora)
    randomize_adapter(layer)
    twin = LoraLinear(make_nf4(256, 512, compute_dtype=compute_dtype), r=8, alpha=16, use_dora=use_dora)
    randomize_adapter(twin)
    twin.cuda()
    x = torch.randn(4, 7, 512, generator=torch.Generator().manual_seed(2))
    x_cpu, x_cuda = x.clone().requires_grad_(True), x.cuda().requires_grad_(True)
    y_cpu, y_cuda = layer(x_cpu), twin(x_cuda)
    tolerance = {"rtol": 1e-4, "atol": 1e-4} if compute_dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(y_cuda.cpu(), y_cpu, **tolerance)
    grad = torch.randn(y_cpu.shape, generator=torch.Generator().manual_seed(3)).to(y_cpu.dtype)
    y_cpu.backward(grad)
    y_cuda.backward(grad.cuda())
    torch.testing.assert_close(x_cuda.grad.cpu(), x_cpu.grad, **tolerance)
    for name in ("lora_A", "lora_B"):
        ours, theirs = getattr(twin, name).weight.grad.cpu(), getattr(layer, name).weight.grad
        scale = max(1.0, theirs.abs().max().item())
        torch.testing.assert_close(ours, theirs, rtol=tolerance["rtol"], atol=tolerance["atol"] * scale, msg=name)


def test_bitsandbytes_cuda_decodes_our_bytes_as_we_do():
    bitsandbytes = pytest.importorskip("bitsandbytes")
    from bitsandbytes.functional import QuantState, dequantize_4bit

    weight = torch.randn(1024, 4096, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    ours = quantize(weight.cuda(), "nf4", 64, False)  # plain float32 absmax: no rounding rule in between
    packed, state = bitsandbytes.functional.quantize_4bit(weight.cuda(), blocksize=64, quant_type="nf4",
                                                          compress_statistics=False)
    assert isinstance(state, QuantState)
    theirs = dequantize_4bit(packed, state)
    assert torch.equal(ours.packed.view(-1).cpu(), packed.view(-1).cpu())
    torch.testing.assert_close(ours.dequantize(torch.bfloat16).cpu(), theirs.cpu(), rtol=0, atol=0)
