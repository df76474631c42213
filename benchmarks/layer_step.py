"""Per-layer QLoRA forward + backward time: nibbletune LoraLinear vs PEFT on bitsandbytes Linear4bit.

Both layers hold the same NF4 + double-quant packed weight and the same LoRA (r=16) values, run
in the same compute dtype (`resolve_compute_dtype("auto")`), in one process, on the same input.
One step = forward, then backward of a fixed upstream gradient (input grad + LoRA grads).

    python benchmarks/layer_step.py                 # CPU-sized defaults
    python benchmarks/layer_step.py --full          # 4096x4096 and 4096x11008, 4x256 tokens
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "modules"))

from nibbletune.devices import resolve_compute_dtype, simd_summary  # noqa: E402
from nibbletune.modules import LinearNF4, LoraLinear  # noqa: E402


def _step(layer, x, grad):
    x = x.detach().requires_grad_(True)
    layer(x).backward(grad)
    for param in layer.parameters():
        param.grad = None


def _time(layer, x, grad, repeats: int) -> list[float]:
    _step(layer, x, grad)  # warm-up (kernel build, allocator)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        _step(layer, x, grad)
        times.append(time.perf_counter() - start)
    return times


def bench(out_features: int, in_features: int, tokens: tuple[int, int], dtype: torch.dtype, repeats: int) -> None:
    from lora_oracles import peft_twin, randomize_adapter

    torch.manual_seed(0)
    linear = nn.Linear(in_features, out_features, bias=False)
    ours = LoraLinear(LinearNF4.from_linear(linear, compute_dtype=dtype), r=16, alpha=32)
    randomize_adapter(ours)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model, _ = peft_twin(ours)
    x = torch.randn(*tokens, in_features).to(dtype)
    grad = torch.randn(*tokens, out_features).to(dtype)
    with torch.no_grad():
        diff = (ours(x).float() - peft_model(x).float()).abs().max().item()
    ours_s = _time(ours, x, grad, repeats)
    peft_s = _time(peft_model, x, grad, repeats)
    ours_med, peft_med = statistics.median(ours_s), statistics.median(peft_s)
    print(
        f"{out_features}x{in_features} tokens={tokens[0]}x{tokens[1]}: "
        f"nibbletune {ours_med * 1e3:.1f} ms (min {min(ours_s) * 1e3:.1f}), "
        f"peft+bnb {peft_med * 1e3:.1f} ms (min {min(peft_s) * 1e3:.1f}), "
        f"ratio peft/nibbletune {peft_med / ours_med:.2f}x, max |output diff| {diff:.2e}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="LLaMA-7B sizes, 4x256 tokens (slow on CPU)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    dtype = resolve_compute_dtype("auto")
    if args.full:
        shapes, tokens = [(4096, 4096), (11008, 4096)], (4, 256)
    else:
        shapes, tokens = [(2048, 2048), (5504, 2048)], (4, 128)
    import bitsandbytes

    print(f"torch {torch.__version__}, bitsandbytes {bitsandbytes.__version__}, threads {torch.get_num_threads()}, "
          f"cpus {os.cpu_count()}")
    print(f"CPU SIMD: {simd_summary()}; compute dtype (auto): {dtype}; LoRA r=16, NF4 + double quant, blocksize 64")
    print("step = forward + backward (input grad + LoRA grads), median of", args.repeats)
    for out_features, in_features in shapes:
        bench(out_features, in_features, tokens, dtype, args.repeats)


if __name__ == "__main__":
    main()
