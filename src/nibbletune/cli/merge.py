"""`nibbletune merge BASE ADAPTER OUT`: fold an adapter into its base, verified against the unmerged model."""

from __future__ import annotations

import sys


def register(subparsers) -> None:
    """Add the `merge` subcommand."""
    parser = subparsers.add_parser(
        "merge", help="merge a LoRA/DoRA adapter into its base model and verify the result",
        description="Merge ADAPTER into BASE as training saw it (dequantized 4-bit base + scaling * B @ A), "
        "write a plain 16/32-bit checkpoint to OUT, and check its logits against the unmerged QLoRA model.",
    )
    parser.add_argument("base", help="the base model directory the adapter was trained on (16-bit or bnb 4-bit)")
    parser.add_argument("adapter", help="PEFT adapter directory (adapter_config.json + adapter_model.safetensors)")
    parser.add_argument("out", help="output directory (must not exist unless --overwrite)")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None,
                        help="dtype of the merged weights (default: the base's dtype, else bfloat16)")
    parser.add_argument("--base-16bit", metavar="PATH", default=None,
                        help="merge onto these original 16-bit weights instead of the dequantized 4-bit base")
    parser.add_argument("--quant-type", choices=["nf4", "fp4"], default=None,
                        help="quantization used in training (default: the adapter's nibbletune.json, else the run's "
                        "config.yaml, else nf4)")
    parser.add_argument("--blocksize", type=int, default=None, help="training blocksize (default: recorded, else 64)")
    parser.add_argument("--no-double-quant", action="store_true", default=None,
                        help="training ran without double quantization")
    parser.add_argument("--no-verify", action="store_true", help="skip the logit comparison")
    parser.add_argument("--tolerance", type=float, default=None,
                        help="maximum |logit diff| / std(logits) accepted by the verification")
    parser.add_argument("--max-shard-size", type=int, default=1024, help="output shard size in MiB")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    parser.set_defaults(func=run)


def run(args) -> int:
    """Merge, verify, and say plainly what was written."""
    from ..export.atomic import human_bytes
    from ..export.merge import merge
    from ..export.training_record import recorded_base_quantization
    from ..quant import QuantSettings

    if args.base_16bit:
        print("warning: merging onto the original 16-bit weights: the 4-bit quantization error the adapter was "
              "trained to compensate is not in this merge, so outputs differ from the QLoRA model", file=sys.stderr)
    quant = None
    if args.quant_type or args.blocksize or args.no_double_quant:
        recorded = recorded_base_quantization(args.adapter).settings
        quant = (recorded or QuantSettings()).with_changes(
            quant_type=args.quant_type, blocksize=args.blocksize, double_quant=False if args.no_double_quant else None)
    report = merge(
        args.base, args.adapter, args.out, dtype=args.dtype, base_16bit=args.base_16bit,
        quant=quant, verify=not args.no_verify, tolerance=args.tolerance,
        overwrite=args.overwrite, max_shard_bytes=args.max_shard_size << 20,
    )
    onto = "the original 16-bit weights" if report.base_16bit else "the dequantized 4-bit base (as in training)"
    print(f"merged {report.merged_modules} adapter modules onto {onto}")
    if not report.base_16bit:
        print(report.base_record.describe())
    if report.verification is not None:
        print(f"verification against the unmerged QLoRA model: {report.verification.summary()}")
    else:
        print("verification skipped (--no-verify)")
    print(f"wrote {report.out}: {human_bytes(report.output_bytes)} of weights in {report.dtype}")
    print(f"note: the merged model is {report.dtype} ({'32' if report.dtype == 'float32' else '16'}-bit), "
          "not 4-bit; to re-quantize it run:")
    print(f"  nibbletune quantize {report.out} {report.out}-nf4")
    return 0
