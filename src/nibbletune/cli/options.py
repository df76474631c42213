"""Options shared by several commands: the quantization options (read into one QuantSettings) and the
output-directory options of the commands that write a checkpoint (`quantize`, `merge`).

`quantize` writes a new base, so its quantization options have the format's defaults; `merge`
rebuilds the base an adapter trained on, so its options default to what the adapter records
(`loading.base_record`) and only override it when given.
"""

from __future__ import annotations

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)


def add_quant_options(parser, recorded: bool) -> None:
    """--quant-type, --blocksize, --no-double-quant; `recorded`: unset means "as the adapter records"."""
    default = "the adapter's nibbletune.json, else the run's config.yaml, else {}"
    parser.add_argument("--quant-type", choices=["nf4", "fp4", "int4"], default=None if recorded else "nf4",
                        help=f"4-bit code book (default: {default.format('nf4') if recorded else 'nf4'})")
    parser.add_argument("--blocksize", type=int, choices=BLOCKSIZES, default=None if recorded else 64,
                        help=f"weights per absmax scale (default: {default.format('64') if recorded else '64'})")
    parser.add_argument("--no-double-quant", action="store_true",
                        help="absmax stored in float32 (4.5 bits/param)" if not recorded
                        else "training ran without double quantization")


def quant_from_options(args, base=None):
    """QuantSettings from the parsed options over `base` (default QuantSettings()); None when `base` is None
    and no option was given (merge then uses the adapter's record as it stands)."""
    from ..quant import QuantSettings

    changes = {"quant_type": args.quant_type, "blocksize": args.blocksize,
               "double_quant": False if args.no_double_quant else None}
    if base is None and all(value is None for value in changes.values()):
        return None
    return (base or QuantSettings()).with_changes(**changes)


def add_output_options(parser) -> None:
    """OUT, --max-shard-size and --overwrite of a command that writes a sharded checkpoint directory."""
    parser.add_argument("out", help="output directory (must not exist unless --overwrite)")
    parser.add_argument("--max-shard-size", type=int, default=1024, help="output shard size in MiB (bounds memory)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
