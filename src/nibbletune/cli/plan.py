"""`nibbletune plan CONFIG.yaml`: predict a run's peak memory from the model's config alone, and whether it fits."""

from __future__ import annotations

import argparse
import json


def register(subparsers) -> None:
    """Add the `plan` subcommand."""
    parser = subparsers.add_parser(
        "plan", help="predict a training run's peak memory before loading anything",
        description="Predict the peak memory of `nibbletune train CONFIG.yaml` from the base's config.json (a\n"
        "local directory, a GGUF file, or a Hub id, of which only config.json is fetched) and the training\n"
        "config: a table of what holds the memory, the peak, whether it fits, and when it does not, the\n"
        "changes that would make it fit, cheapest first, each with its predicted peak. On CPU the peak is\n"
        "the process's peak RSS; on CUDA, per GPU (per rank under ddp/fsdp).",
        epilog="examples:\n  nibbletune plan runs/demo/config.yaml\n"
        "  nibbletune plan config.yaml --device cuda --memory 24GiB --set train.micro_batch_size=8\n"
        "  nibbletune plan config.yaml --device a100-80gb --set train.distributed=fsdp --world-size 8 --json",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="training config (YAML)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key (repeatable), e.g. --set train.seq_len=2048")
    parser.add_argument("--device", default="cpu", metavar="cpu|cuda|NAME",
                        help="where the run trains: cpu, cuda[:N], or a GPU name such as a100-80gb, h100, rtx4090 "
                        "(default: cpu)")
    parser.add_argument("--memory", default=None, metavar="SIZE",
                        help="memory to fit in, e.g. 24GiB (default: the device's total memory)")
    parser.add_argument("--world-size", type=int, default=None, metavar="N",
                        help="ranks under train.distributed ddp or fsdp (default: WORLD_SIZE, else 2)")
    parser.add_argument("--json", action="store_true",
                        help='print {"peak_bytes", "components", "fits", "suggestions"} as JSON')
    parser.set_defaults(func=run)


def _gib(count: int) -> str:
    return f"{count / 2**30:.2f} GiB"


def table(plan) -> str:
    """The plan as text: components, peak, fits, suggestions."""
    width = max(len(name) for name in plan.components) + 2
    lines = [f"{'component':<{width}} {'bytes':>12}", "-" * (width + 13)]
    lines += [f"{name:<{width}} {_gib(count):>12}" for name, count in plan.components.items()]
    lines += ["-" * (width + 13), f"{'peak' + (' per rank' if plan.world_size > 1 else ''):<{width}} "
              f"{_gib(plan.peak_bytes):>12}"]
    memory = "unknown (give --memory)" if plan.memory_bytes is None else _gib(plan.memory_bytes)
    verdict = {True: "yes", False: "no", None: "unknown"}[plan.fits]
    lines.append(f"fits in {memory} on {plan.device}: {verdict}")
    if plan.suggestions:
        lines.append("to fit, cheapest first (each change alone):")
        for suggestion in plan.suggestions:
            sets = " ".join(f"--set {key}={str(value).lower() if isinstance(value, bool) else value}" for key, value in suggestion.changes.items()
                            if key != "world_size")
            ranks = f" --world-size {suggestion.changes['world_size']}" if "world_size" in suggestion.changes else ""
            lines.append(f"  {_gib(suggestion.peak_bytes):>10}  {suggestion.description}  ({sets}{ranks})")
    return "\n".join(lines)


def run(args) -> int:
    """Plan and print the table (or JSON); bad input is one NibbletuneError line."""
    from ..errors import NibbletuneError
    from ..training.memory_plan import plan

    if args.world_size is not None and args.world_size < 1:
        raise NibbletuneError(f"--world-size {args.world_size}: expected 1 or more ranks")
    result = plan(args.config, args.overrides, device=args.device, memory=args.memory, world_size=args.world_size)
    print(json.dumps(result.to_dict(), indent=2) if args.json else table(result))
    return 0
