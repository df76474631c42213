"""`nibbletune eval`: held-out loss, perplexity and greedy-generation accuracy, base vs base+adapter.

Two forms: `nibbletune eval CONFIG.yaml [--set key=value]` evaluates what a training config
trained (base `model`, adapter `output_dir`, data `data.eval_path`), and
`nibbletune eval --model BASE [--adapter DIR] --data FILE` names them directly.
"""

from __future__ import annotations

import argparse
import sys

_CONFIG_GIVES = ("model", "adapter", "data", "format", "seq_len")


def _limit(text: str):
    if text == "all":
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of examples or 'all', got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected 0 or more examples, got {value}")
    return value


def register(subparsers) -> None:
    """Add the `eval` subcommand."""
    parser = subparsers.add_parser(
        "eval", help="score a base model and base+adapter on held-out data",
        description="Held-out loss and perplexity over every row, and greedy generation scored against each\n"
        "row's reference (a completion, an alpaca output, a chat's last assistant turn): exact match,\n"
        "first lines match, contains answer. The base is loaded once, in 4 bits as the adapter records,\n"
        "scored, then scored again with the adapter on it. Prints a table (base, base+adapter, change),\n"
        "or JSON with --json.",
        epilog="examples:\n  nibbletune eval runs/demo/config.yaml\n"
        "  nibbletune eval --model models/base --adapter runs/demo --data data/eval.jsonl --json",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", nargs="?", default=None,
                        help="training config: base `model`, adapter `output_dir`, data `data.eval_path`")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a key of CONFIG (repeatable), e.g. --set data.eval_path=other.jsonl")
    parser.add_argument("--model", default=None, help="base model directory or Hub id (without CONFIG)")
    parser.add_argument("--adapter", default=None, help="adapter directory; omit to score the base alone")
    parser.add_argument("--data", default=None, help="held-out dataset file (jsonl, json, csv, parquet)")
    parser.add_argument("--format", default=None,
                        help="row format: auto, or a format `nibbletune data` knows, e.g. completion, alpaca, chat "
                        "(default: auto)")
    parser.add_argument("--seq-len", type=int, default=None,
                        help="tokens per example; longer prompts are not generated from (default: 512)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="examples per batch (default: train.micro_batch_size with CONFIG, else 8)")
    parser.add_argument("--limit", type=_limit, default=None, metavar="N|all",
                        help="generation examples at most, 0 for none (default: 100; the loss covers every row)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="longest continuation (default: 64)")
    parser.add_argument("--compute-dtype", default=None, choices=["auto", "float32", "bfloat16", "float16"],
                        help="activation dtype of the 4-bit base (default: what the adapter trained with, else auto)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    parser.set_defaults(func=run)


def build_job(args):
    """The EvalJob the parsed arguments describe; NibbletuneError for a wrong mix of forms."""
    from dataclasses import replace

    from ..errors import NibbletuneError
    from ..evaluation import EvalJob

    tuning = {"batch_size": args.batch_size, "limit": None if args.limit == "all" else args.limit,
              "max_new_tokens": args.max_new_tokens, "compute_dtype": args.compute_dtype}
    if args.config is not None:
        given = [name for name in _CONFIG_GIVES if getattr(args, name) is not None]
        if given:
            flag = "--" + given[0].replace("_", "-")
            raise NibbletuneError(f"{flag} does not combine with CONFIG, which gives the model, adapter and data; "
                                  "use --set (e.g. --set data.eval_path=FILE) or drop CONFIG")
        job = EvalJob.from_config(args.config, args.overrides, **tuning)
    else:
        if args.overrides:
            raise NibbletuneError("--set changes a CONFIG; without one, use --model, --adapter and --data")
        missing = [flag for flag, value in (("--model", args.model), ("--data", args.data)) if value is None]
        if missing:
            raise NibbletuneError(f"give a training CONFIG, or {' and '.join(missing)} (see nibbletune eval --help)")
        job = EvalJob(model=args.model, data=args.data, adapter=args.adapter).with_changes(
            format=args.format, seq_len=args.seq_len, **tuning)
    return replace(job, limit=None) if args.limit == "all" else job


def run(args) -> int:
    """Evaluate and print the table (or JSON); notes and progress go to stderr."""
    from ..evaluation import evaluate_adapter

    job = build_job(args)
    report = evaluate_adapter(job, log=lambda line: print(f"nibbletune eval: {line}", file=sys.stderr, flush=True))
    print(report.to_json() if args.json else report.table())
    return 0
