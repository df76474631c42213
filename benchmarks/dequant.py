"""Benchmark CPU 4-bit dequantization: bitsandbytes vs nibbletune's C kernel vs the torch fallback.

Usage: python benchmarks/dequant.py [--quick] [--reps N]

For each weight size (NF4, blocksize 64, double quantization) and output dtype, the methods run
side by side in one process, interleaved repetition by repetition so that background load hits
them alike; each figure is the median of the repetitions after a warm-up call. All methods
decode the same bytes (bitsandbytes' own quantize_4bit output), and the script checks that
nibbletune's result equals bitsandbytes' bit for bit.

GB/s counts bytes read (packed codes + absmax codes + nested absmax) plus bytes written.
"fresh" allocates a new output per call (page faults included, as bitsandbytes does);
"reused out" writes into one preallocated tensor. "memcpy" copies a tensor of the output's size
and dtype into a reused one (torch's copy_, read + write counted): the machine's memory bandwidth
for that output, which a decoder writing the same bytes can at best approach.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import torch

from nibbletune.devices import simd_summary
from nibbletune.quant import QuantizedTensor
from nibbletune.quant.cpu_kernel import cpu_kernel_available, simd_level
from nibbletune.quant.dequantize import dequantize_torch

SIZES = ((1024, 1024), (4096, 4096), (4096, 14336))
DTYPES = (torch.bfloat16, torch.float32)
SLOW_REPS = 3  # the torch fallback is ~100x slower than the kernel: fewer rounds keep the run short


def _median_seconds(methods: dict, reps: int, slow: tuple[str, ...] = ()) -> dict[str, float]:
    """Warm each method up once, then time interleaved rounds; return medians.

    Methods named in `slow` take part in the first SLOW_REPS rounds only.
    """
    for run in methods.values():
        run()
    times: dict[str, list[float]] = {name: [] for name in methods}
    for round_index in range(reps):
        for name, run in methods.items():
            if name in slow and round_index >= SLOW_REPS:
                continue
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def _bench_size(shape: tuple[int, int], reps: int) -> list[tuple]:
    import bitsandbytes.functional as bnbf

    weight = torch.randn(shape, dtype=torch.bfloat16)
    packed, state = bnbf.quantize_4bit(weight, blocksize=64, compress_statistics=True, quant_type="nf4")
    del weight
    qt = QuantizedTensor(
        packed, state.absmax, torch.Size(shape), torch.bfloat16, 64, "nf4",
        nested_absmax=state.state2.absmax, nested_offset=float(state.offset),
    )
    numel = qt.numel
    read_bytes = packed.numel() + state.absmax.numel() + state.state2.absmax.numel() * 4
    rows = []
    for dtype in DTYPES:
        bnb_state = copy.copy(state)
        bnb_state.dtype = dtype
        out = torch.empty(shape, dtype=dtype)
        copy_source, copy_target = torch.ones(shape, dtype=dtype), torch.empty(shape, dtype=dtype)
        same = torch.equal(bnbf.dequantize_4bit(packed, bnb_state), qt.dequantize(dtype))
        methods = {
            "bitsandbytes": lambda: bnbf.dequantize_4bit(packed, bnb_state),
            "nibbletune": lambda: qt.dequantize(dtype),
            "nibbletune (reused out)": lambda: qt.dequantize(dtype, out=out),
            "torch fallback": lambda: dequantize_torch(qt, dtype),
            "memcpy": lambda: copy_target.copy_(copy_source),
        }
        seconds = _median_seconds(methods, reps, slow=("torch fallback",))
        total_bytes = read_bytes + numel * out.element_size()
        for name, sec in seconds.items():
            moved = 2 * numel * out.element_size() if name == "memcpy" else total_bytes
            rows.append((
                f"{shape[0]}x{shape[1]}", str(dtype).replace("torch.", ""), name, sec * 1e3,
                numel / sec / 1e9, moved / sec / 1e9, seconds["bitsandbytes"] / sec,
                "" if name.startswith(("bitsandbytes", "torch", "memcpy")) else ("yes" if same else "NO"),
            ))
    return rows


def main() -> None:
    """Print the machine summary and the benchmark table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions, skip the largest size")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions (default 7, quick 3)")
    args = parser.parse_args()
    reps = args.reps or (3 if args.quick else 7)
    sizes = SIZES[:2] if args.quick else SIZES

    import bitsandbytes

    print(f"CPU SIMD flags: {simd_summary()}")
    print(f"torch {torch.__version__}, threads: {torch.get_num_threads()}; "
          f"bitsandbytes {bitsandbytes.__version__}")
    available = cpu_kernel_available()
    print(f"nibbletune C kernel: {'available, ' + simd_level() + ' path' if available else 'NOT available'}")
    print(f"NF4, blocksize 64, double quant; median of {reps} after warm-up "
          f"(torch fallback: {min(reps, SLOW_REPS)}); load average {os.getloadavg()[0]:.2f}\n")
    header = ("size", "out", "method", "ms", "Gparam/s", "GB/s", "x bnb", "==bnb")
    line = "{:<11} {:<9} {:<24} {:>9} {:>9} {:>7} {:>7} {:>6}"
    print(line.format(*header))
    started = time.perf_counter()
    for shape in sizes:
        for size, dtype, name, ms, gparams, gbytes, ratio, same in _bench_size(shape, reps):
            figures = (f"{ms:.2f}", f"{gparams:.3f}", f"{gbytes:.2f}", f"{ratio:.2f}")
            print(line.format(size, dtype, name, *figures, same))
        print()
    print(f"total benchmark time {time.perf_counter() - started:.1f} s; "
          f"load average {os.getloadavg()[0]:.2f} (above {os.cpu_count()}, other processes share the CPUs)")


if __name__ == "__main__":
    main()
