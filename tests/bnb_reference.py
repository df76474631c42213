"""transformers + bitsandbytes as a reference model, on the code path where it is exact.

On CPUs with AVX512-BF16, bitsandbytes' Linear4bit in eval mode without gradients switches to a
packed bf16 kernel (`_convert_weight_packed_for_cpu`) even when the compute dtype is float32, and
repacks the weight in place (a checkpoint saved after such a forward differs). Its other path,
dequantize then torch's matmul in the compute dtype, is what the format defines, so references
built here turn the fast kernel off.
"""

from __future__ import annotations

import warnings

import torch


def exact_bnb(model: torch.nn.Module) -> torch.nn.Module:
    """`model` with bitsandbytes' AVX512-BF16 inference kernel turned off on every Linear4bit."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model


def bnb_model(path, dtype: torch.dtype = torch.float32, cls=None, **bnb_options) -> torch.nn.Module:
    """transformers+bitsandbytes loading `path` (4-bit with `bnb_options`, or as stored), exact path, eval mode."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    cls = cls or AutoModelForCausalLM
    kwargs = {"quantization_config": BitsAndBytesConfig(**bnb_options)} if bnb_options else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = cls.from_pretrained(path, dtype=dtype, device_map="cpu", **kwargs)
    return exact_bnb(model).eval()
