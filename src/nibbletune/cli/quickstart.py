"""`nibbletune quickstart`: build (once) a tiny pretrained base offline and QLoRA-fine-tune it, with a report."""

from __future__ import annotations


def register(subparsers) -> None:
    """Add the `quickstart` subcommand."""
    parser = subparsers.add_parser(
        "quickstart", help="offline end-to-end QLoRA job in a few minutes on CPU",
        description="Pretrain (once, cached) a tiny Llama on the Python standard library, then QLoRA "
        "fine-tune it to write a function's def line from its docstring, and print held-out loss and a "
        "generation before and after.")
    parser.add_argument("--output-dir", default="runs/quickstart", help="where the adapter and metrics go")
    parser.add_argument("--steps", type=int, default=120, help="fine-tuning steps (default 120)")
    parser.add_argument("--pretrain-seconds", type=float, default=120.0,
                        help="time budget for pretraining the base when it is built (default 120)")
    parser.add_argument("--rebuild", action="store_true", help="rebuild the cached base model")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(func=run)


def run(args) -> int:
    from ..train.quickstart import run_quickstart

    run_quickstart(args.output_dir, steps=args.steps, pretrain_seconds=args.pretrain_seconds,
                   rebuild=args.rebuild, progress=not args.no_progress)
    return 0
