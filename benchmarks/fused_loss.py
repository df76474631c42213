"""The output head + cross-entropy alone, forward and backward: the fused chunked loss vs the plain logits path.

The plain path is what transformers does: [tokens, vocab] logits, float32, then cross-entropy.
The fused one is `modules.linear_cross_entropy` at its default chunk and at 4x / 0.25x of it.
The head is frozen (QLoRA), so only dL/dhidden is computed, as in training.

    python benchmarks/fused_loss.py                        # SmolLM2's head: 1020 x 576 x 49152
    python benchmarks/fused_loss.py --vocab 262144 --hidden 640 --dtype bfloat16   # Gemma 3 270M's
"""

from __future__ import annotations

import argparse
import time

import torch

from nibbletune.devices import simd_summary
from nibbletune.modules.linear_cross_entropy import CHUNK_ELEMENTS, linear_cross_entropy_sum


def seconds_per_call(fn, repeats: int) -> float:
    """Mean wall time of `fn()` over `repeats` calls after one warm-up call."""
    fn()
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - started) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=1020)
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    weight = (torch.randn(args.vocab, args.hidden) * 0.02).to(dtype)
    targets = torch.randint(0, args.vocab, (args.tokens,))

    def plain():
        hidden = torch.randn(args.tokens, args.hidden, dtype=dtype, requires_grad=True)
        logits = (hidden @ weight.t()).float()
        torch.nn.functional.cross_entropy(logits, targets, reduction="sum").backward()

    def fused(chunk_elements):
        def run():
            hidden = torch.randn(args.tokens, args.hidden, dtype=dtype, requires_grad=True)
            linear_cross_entropy_sum(hidden, weight, targets, chunk_elements=chunk_elements).backward()
        return run

    print(f"SIMD flags: {simd_summary()}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"{args.tokens} x {args.hidden} x {args.vocab}, {args.dtype}")
    print("| path | s per forward + backward |\n|---|---|")
    print(f"| plain logits + cross-entropy | {seconds_per_call(plain, args.repeats):.3f} |")
    for factor in (0.25, 1, 4):
        chunk = int(CHUNK_ELEMENTS * factor)
        print(f"| fused, {chunk} logits per chunk | {seconds_per_call(fused(chunk), args.repeats):.3f} |")


if __name__ == "__main__":
    main()
