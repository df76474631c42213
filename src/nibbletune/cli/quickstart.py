"""`nibbletune quickstart`: build (once) a tiny pretrained base offline, QLoRA-fine-tune it, report."""

from __future__ import annotations


def register(subparsers) -> None:
    """Add the `quickstart` subcommand (nothing heavy imported until it runs)."""
    parser = subparsers.add_parser(
        "quickstart", help="offline end-to-end QLoRA job in a few minutes on CPU",
        description="Pretrain (once, cached) a tiny Llama on the Python standard library, then QLoRA "
        "fine-tune it to write a function's def line from its docstring, and print held-out loss and "
        "generations before and after.")
    parser.add_argument("--output-dir", default="runs/quickstart", help="where the adapter and metrics go")
    parser.add_argument("--steps", type=int, help="fine-tuning steps (default: the recipe's, 250)")
    parser.add_argument("--pretrain-steps", type=int,
                        help="pretraining steps when the base is built (default: the recipe's, 320)")
    parser.add_argument("--pretrain-seconds", type=float,
                        help="time cap on pretraining the base (default: the recipe's, 150)")
    parser.add_argument("--rebuild", action="store_true", help="rebuild the cached base model")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(func=run)


def run(args) -> int:
    """Run the quickstart with the parsed arguments."""
    from ..recipes.quickstart import run_quickstart

    given = {"steps": args.steps, "pretrain_steps": args.pretrain_steps,
             "pretrain_seconds": args.pretrain_seconds}
    run_quickstart(args.output_dir, rebuild=args.rebuild, progress=not args.no_progress,
                   **{key: value for key, value in given.items() if value is not None})
    return 0
