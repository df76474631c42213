"""`nibbletune train CONFIG.yaml [--set key=value ...] [--resume]`: QLoRA fine-tuning from a YAML config."""

from __future__ import annotations

import argparse
import os
import textwrap


def _keys_help() -> str:
    from ..training.config import describe_keys

    lines = ["config keys (YAML, or --set KEY=VALUE):"]
    for key, default, description in describe_keys():
        text = f"{description} [default: {default}]"
        wrapped = textwrap.wrap(text, 72) or [""]
        lines.append(f"  {key:<30} {wrapped[0]}")
        lines += [f"  {'':<30} {more}" for more in wrapped[1:]]
    lines.append("")
    lines.append("A documented example covering every key: examples/train_full.yaml")
    return "\n".join(lines)


def register(subparsers) -> None:
    """Add the `train` subcommand."""
    parser = subparsers.add_parser(
        "train", help="fine-tune LoRA adapters on a 4-bit base model",
        description="Fine-tune LoRA adapters on a 4-bit (NF4/FP4/INT4) base model from a YAML config. "
        "Writes output_dir/adapter_model.safetensors + adapter_config.json (PEFT format), "
        "metrics.jsonl, loss_curve.png, checkpoints/ and config.yaml (train.report_to adds TensorBoard or "
        "W&B). Ctrl-C saves a checkpoint and stops.",
        epilog=_keys_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="YAML config file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, value read as YAML (repeatable), e.g. --set train.lr=1e-4")
    parser.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CHECKPOINT",
                        help="continue from the newest checkpoint in output_dir, or from the given one")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--check", action="store_true", help="validate the config, print it and exit")
    parser.set_defaults(func=run)


def run(args) -> int:
    """Validate the config, then train; user errors surface as NibbletuneError (one line)."""
    import yaml

    from ..training import load_config, train
    from ..training.metrics import check_reporter

    config = load_config(args.config, args.overrides)
    check_reporter(config.train.report_to)  # train.report_to's package, before --check says the config is good
    if args.check:
        print(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False), end="")
        return 0
    result = train(config, resume=args.resume, progress=not args.no_progress)
    if os.environ.get("RANK", "0") != "0":  # under torchrun, rank 0 reports for the job
        return 0
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    ranks = f" on {world_size} ranks ({config.train.distributed})" if world_size > 1 else ""
    summary = f"trained {result.steps} steps{ranks} in {result.wall_seconds:.1f} s; final loss {result.final_loss:.4f}"
    if result.eval_loss is not None:
        summary += f"; eval loss {result.eval_loss:.4f}"
    print(summary)
    print(f"adapter: {result.output_dir / 'adapter_model.safetensors'}")
    return 0
