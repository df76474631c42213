"""Time the Triton dequantize kernel against bitsandbytes' CUDA `dequantize_4bit`.

    python benchmarks/dequant_gpu.py [--peak-gbs 3350] [--sweep]

For 4096x4096, 8192x8192 and 4096x14336 bfloat16 weights quantized by bitsandbytes (NF4,
blocksize 64, double quant) it decodes the *same bytes* with both kernels, checks that the
outputs are bit-identical, and prints Gparam/s, GB/s (packed codes + absmax codes + nested
scales read, bf16 written) and the percentage of the GPU's peak memory bandwidth. `--sweep`
also tries other block_bytes / num_warps tilings of the Triton kernel. Without CUDA it says so
and exits 0.
"""

import argparse
import sys

import torch

SHAPES = [(4096, 4096), (8192, 8192), (4096, 14336)]
BLOCKSIZE = 64
# Peak HBM bandwidth in GB/s by device name, when the driver does not report clock and bus width.
PEAK_GBS_BY_NAME = {"H100 SXM": 3350, "H100 NVL": 3900, "H100 PCIe": 2000, "H100": 3350, "H200": 4800,
                    "A100-SXM4-80GB": 2039, "A100-PCIE-80GB": 1935, "A100": 1555, "L40S": 864, "L4": 300}


def peak_bandwidth_gbs(override: float | None) -> float | None:
    """The GPU's peak memory bandwidth in GB/s: --peak-gbs, else clock x bus width, else a table."""
    if override:
        return override
    props = torch.cuda.get_device_properties(0)
    clock_khz = getattr(props, "memory_clock_rate", None)
    bus_bits = getattr(props, "memory_bus_width", None)
    if clock_khz and bus_bits:
        return 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9  # double data rate
    for name, gbs in PEAK_GBS_BY_NAME.items():
        if name in props.name:
            return gbs
    return None


def time_ms(fn, iters: int = 50) -> float:
    """Median milliseconds of `fn()` over `iters` runs, after warm-up, with CUDA events."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def report(label: str, ms: float, numel: int, nbytes: int, peak: float | None) -> None:
    """Print one line of throughput numbers."""
    gbs = nbytes / ms / 1e6
    share = f"{100 * gbs / peak:5.1f}% of {peak:.0f} GB/s" if peak else "peak unknown"
    print(f"  {label:<34} {ms * 1e3:9.1f} us  {numel / ms / 1e6:7.1f} Gparam/s  {gbs:7.1f} GB/s  {share}")


def main() -> int:
    """Run the benchmark; return the process exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peak-gbs", type=float, default=None, help="peak memory bandwidth in GB/s")
    parser.add_argument("--sweep", action="store_true", help="also try other Triton tilings")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to benchmark")
        return 0
    import bitsandbytes.functional as bnb_f

    from nibbletune.quant.tensor import QuantizedTensor
    from nibbletune.quant.triton_kernel import DEFAULT_NUM_WARPS, default_block_bytes, dequantize_triton

    peak = peak_bandwidth_gbs(args.peak_gbs)
    name = torch.cuda.get_device_name(0)
    print(f"{name}, peak {peak or '?'} GB/s, bf16 NF4 blocksize {BLOCKSIZE} + double quant")
    default = (default_block_bytes(torch.bfloat16), DEFAULT_NUM_WARPS)
    tilings = [default]
    if args.sweep:
        tilings += [(b, w) for b in (256, 512, 1024, 2048, 4096) for w in (2, 4, 8, 16) if (b, w) != default]
    status = 0
    for rows, cols in SHAPES:
        weight = torch.randn(rows, cols, dtype=torch.bfloat16, device="cuda")
        packed, state = bnb_f.quantize_4bit(
            weight, blocksize=BLOCKSIZE, compress_statistics=True, quant_type="nf4"
        )
        qt = QuantizedTensor(packed, state.absmax, weight.shape, torch.bfloat16, BLOCKSIZE, "nf4",
                             state.state2.absmax, float(state.offset))
        numel = weight.numel()
        nbytes = packed.numel() + state.absmax.numel() + 4 * state.state2.absmax.numel() + 2 * numel
        out = torch.empty_like(weight)
        bnb_out = torch.empty_like(weight)
        print(f"{rows}x{cols} ({numel / 1e6:.1f} M params, {nbytes / 1e6:.1f} MB moved)")
        bnb_ms = time_ms(lambda: bnb_f.dequantize_4bit(packed, state, out=bnb_out))
        report("bitsandbytes dequantize_4bit", bnb_ms, numel, nbytes, peak)
        for block_bytes, num_warps in tilings:
            ms = time_ms(lambda: dequantize_triton(qt, torch.bfloat16, out, block_bytes=block_bytes,
                                                   num_warps=num_warps))
            report(f"triton block_bytes={block_bytes} warps={num_warps}", ms, numel, nbytes, peak)
            if not torch.equal(out.view(torch.int16), bnb_out.view(torch.int16)):
                differ = int((out.view(torch.int16) != bnb_out.view(torch.int16)).sum())
                print(f"    MISMATCH: {differ} values differ from bitsandbytes")
                status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
