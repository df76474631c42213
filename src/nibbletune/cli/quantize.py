"""`nibbletune quantize SRC OUT`: write a checkpoint in the bitsandbytes 4-bit serialization."""

from __future__ import annotations


def register(subparsers) -> None:
    """Add the `quantize` subcommand."""
    parser = subparsers.add_parser(
        "quantize", help="quantize a safetensors checkpoint's linear weights to a bitsandbytes 4-bit checkpoint",
        description="Stream SRC tensor by tensor and write OUT in the bitsandbytes 4-bit layout "
        "(loadable with transformers + bitsandbytes or `nibbletune` itself).",
    )
    parser.add_argument("src", help="model directory with config.json and safetensors weights")
    parser.add_argument("out", help="output directory (must not exist unless --overwrite)")
    parser.add_argument("--quant-type", default="nf4", choices=["nf4", "fp4"])
    parser.add_argument("--no-double-quant", action="store_true", help="store absmax in float32 (4.5 bits/param)")
    parser.add_argument("--blocksize", type=int, default=64, choices=[32, 64, 128, 256, 512, 1024, 2048, 4096])
    parser.add_argument("--compute-dtype", choices=["float32", "float16", "bfloat16"], default=None,
                        help="bnb_4bit_compute_dtype recorded in the config (default: the checkpoint's dtype)")
    parser.add_argument("--skip-modules", nargs="*", default=None, help="linears to keep in full precision")
    parser.add_argument("--max-shard-size", type=int, default=1024, help="output shard size in MiB (bounds memory)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    parser.set_defaults(func=run)


def run(args) -> int:
    """Quantize and print a one-paragraph summary."""
    from ..export.atomic import human_bytes
    from ..export.quantize_checkpoint import quantize_checkpoint
    from ..quant import QuantSettings

    quant = QuantSettings(quant_type=args.quant_type, blocksize=args.blocksize, double_quant=not args.no_double_quant,
                          compute_dtype=args.compute_dtype or "auto", skip_modules=tuple(args.skip_modules or ()))
    report = quantize_checkpoint(args.src, args.out, quant, overwrite=args.overwrite,
                                 max_shard_bytes=args.max_shard_size << 20)
    print(f"quantized {report.quantized} linear weights to {args.quant_type} (blocksize {args.blocksize}, "
          f"double quant {not args.no_double_quant}); {report.copied} other tensors copied unchanged")
    print(f"size: {human_bytes(report.source_bytes)} -> {human_bytes(report.output_bytes)}; written to {report.out}")
    return 0
