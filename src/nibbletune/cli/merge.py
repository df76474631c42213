"""`nibbletune merge BASE ADAPTER OUT`: fold an adapter into its base, verified against the unmerged model.

ADAPTER is merged into BASE as training saw it (the dequantized 4-bit base + scaling * B @ A), a
plain 16/32-bit checkpoint is written to OUT, and its logits are checked against the unmerged
QLoRA model.
"""

from __future__ import annotations

import sys

from .options import add_output_options, add_quant_options, quant_from_options


def register(subparsers) -> None:
    """Add the `merge` subcommand."""
    summary = "merge a LoRA/DoRA adapter into its base model and verify the result"
    parser = subparsers.add_parser("merge", help=summary, description=__doc__)
    parser.add_argument("base", help="the base model directory the adapter was trained on (16-bit or bnb 4-bit)")
    parser.add_argument("adapter", help="PEFT adapter directory (adapter_config.json + adapter_model.safetensors)")
    add_output_options(parser)
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None,
                        help="dtype of the merged weights (default: the base's dtype, else bfloat16)")
    parser.add_argument("--base-16bit", metavar="PATH", default=None,
                        help="merge onto these original 16-bit weights instead of the dequantized 4-bit base")
    add_quant_options(parser, recorded=True)
    parser.add_argument("--no-verify", action="store_true", help="skip the logit comparison")
    parser.add_argument("--tolerance", type=float, default=None,
                        help="maximum |logit diff| / std(logits) accepted by the verification")
    parser.set_defaults(func=run)


def run(args) -> int:
    """Merge, verify, and say plainly what was written."""
    from ..export.atomic import human_bytes
    from ..export.merge import merge
    from ..loading.base_record import recorded_base_quantization

    if args.base_16bit:
        print("warning: merging onto the original 16-bit weights: the 4-bit quantization error the adapter was "
              "trained to compensate is not in this merge, so outputs differ from the QLoRA model", file=sys.stderr)
    quant = quant_from_options(args)
    if quant is not None:  # options change the recorded settings, they do not replace all of them
        quant = quant_from_options(args, recorded_base_quantization(args.adapter).settings or quant)
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
