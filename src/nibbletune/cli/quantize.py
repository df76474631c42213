"""`nibbletune quantize SRC OUT`: write a checkpoint in the bitsandbytes 4-bit serialization.

SRC is streamed tensor by tensor and OUT written in the bitsandbytes 4-bit layout, loadable with
transformers + bitsandbytes or with nibbletune itself.
"""

from __future__ import annotations

from .options import add_output_options, add_quant_options, quant_from_options


def register(subparsers) -> None:
    """Add the `quantize` subcommand."""
    summary = "quantize a safetensors checkpoint's linear weights to a bitsandbytes 4-bit checkpoint"
    parser = subparsers.add_parser("quantize", help=summary, description=__doc__)
    parser.add_argument("src", help="model directory with config.json and safetensors weights")
    add_output_options(parser)
    add_quant_options(parser, recorded=False)
    parser.add_argument("--compute-dtype", choices=["float32", "float16", "bfloat16"], default=None,
                        help="bnb_4bit_compute_dtype recorded in the config (default: the checkpoint's dtype)")
    parser.add_argument("--skip-modules", nargs="*", default=None, help="linears to keep in full precision")
    parser.set_defaults(func=run)


def run(args) -> int:
    """Quantize and print a one-paragraph summary."""
    from ..export.atomic import human_bytes
    from ..export.quantize_checkpoint import quantize_checkpoint
    from ..quant import QuantSettings

    quant = quant_from_options(args, QuantSettings(compute_dtype=args.compute_dtype or "auto",
                                                   skip_modules=tuple(args.skip_modules or ())))
    report = quantize_checkpoint(args.src, args.out, quant, overwrite=args.overwrite,
                                 max_shard_bytes=args.max_shard_size << 20)
    print(f"quantized {report.quantized} linear weights to {args.quant_type} (blocksize {args.blocksize}, "
          f"double quant {not args.no_double_quant}); {report.copied} other tensors copied unchanged")
    print(f"size: {human_bytes(report.source_bytes)} -> {human_bytes(report.output_bytes)}; written to {report.out}")
    return 0
