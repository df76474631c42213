"""`nibbletune demo`: quantize a small model's linear weights and report size and error."""

from __future__ import annotations

import time

import torch


def register(subparsers) -> None:
    """Add the `demo` subcommand."""
    parser = subparsers.add_parser("demo", help="quantize a small built-in model and print size and error")
    parser.add_argument("--quant-type", default="nf4", choices=["nf4", "fp4", "int4"])
    parser.add_argument("--blocksize", type=int, default=64)
    parser.add_argument("--no-double-quant", action="store_true")
    parser.set_defaults(func=run)


def run(args) -> int:
    """Quantize every linear weight of a seeded random Llama-style model and print the figures."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from ..quant import quantize

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=8, vocab_size=4096)
    model = LlamaForCausalLM(config)
    full_bytes = quant_bytes = 0
    errors = []
    start = time.perf_counter()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name != "lm_head":
            weight = module.weight.detach()
            qt = quantize(weight, args.quant_type, args.blocksize, not args.no_double_quant)
            restored = qt.dequantize(torch.float32)
            errors.append(((restored - weight).norm() / weight.norm()).item())
            full_bytes += weight.numel() * 2
            quant_bytes += qt.nbytes
    seconds = time.perf_counter() - start
    print(f"quantized {len(errors)} linear layers ({args.quant_type}, blocksize {args.blocksize}, "
          f"double quant {not args.no_double_quant}) in {seconds:.2f} s")
    print(f"size: {full_bytes / 2**20:.1f} MiB in bf16 -> {quant_bytes / 2**20:.1f} MiB "
          f"({8 * quant_bytes / (full_bytes / 2):.3f} bits/param)")
    print(f"relative error ||W - dequant(W)|| / ||W||: mean {sum(errors) / len(errors):.4f}, max {max(errors):.4f}")
    return 0
