"""`nibbletune data`: show how a dataset is tokenized and masked, with statistics and warnings."""

from __future__ import annotations

import sys


def register(subparsers) -> None:
    """Add the `data` subcommand."""
    parser = subparsers.add_parser(
        "data", help="preview a dataset as the trainer sees it (masking, lengths, warnings)",
        description="Tokenize a dataset with a model's tokenizer and print samples (trained tokens "
        "highlighted), statistics and warnings. Give a train config, or --model and a data path.")
    parser.add_argument("path", nargs="?", help="dataset file or directory (default: the config's data.path)")
    parser.add_argument("--config", help="train YAML config to take model, data and seq_len from")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key (with --config)")
    parser.add_argument("--model", help="model directory whose tokenizer is used")
    parser.add_argument("--seq-len", type=int, help="tokens per sequence (default: config, else 512)")
    parser.add_argument("--format", help="auto, text, completion, alpaca, chat or sharegpt (default: config, else auto)")
    parser.add_argument("--on-bad-rows", choices=["error", "skip"],
                        help="unreadable or unusable rows: stop (error) or leave them out and count them (skip); "
                        "default: config, else error")
    parser.add_argument("--packing", action="store_true", default=None, help="pack examples into sequences")
    parser.add_argument("--limit", type=int, help="only the first N rows")
    parser.add_argument("--samples", type=int, default=3, help="samples to show (default 3)")
    parser.add_argument("--no-color", action="store_true", help="mark trained text with [[ ]] instead of color")
    parser.set_defaults(func=run)


def run(args) -> int:
    from ..data import build_dataset, render_report
    from ..errors import NibbletuneError
    from ..loading import load_tokenizer

    model, path, seq_len, format, packing = args.model, args.path, args.seq_len, args.format, args.packing
    on_bad_rows = args.on_bad_rows
    if args.config:
        from ..training.config import load_config

        config = load_config(args.config, args.overrides)
        model = model or config.model
        path = path or config.data.path
        seq_len = seq_len or config.train.seq_len
        format = format or config.data.format
        packing = config.train.packing if packing is None else packing
        on_bad_rows = on_bad_rows or config.data.on_bad_rows
    if not model or not path:
        raise NibbletuneError("give --config, or --model and a dataset path")
    tokenizer = load_tokenizer(model)
    dataset = build_dataset(path, tokenizer, seq_len or 512, format=format or "auto", packing=bool(packing),
                            limit=args.limit, on_bad_rows=on_bad_rows or "error")
    color = not args.no_color and sys.stdout.isatty()
    print(render_report(dataset, tokenizer, num_samples=args.samples, color=color))
    return 0
