"""`nibbletune quickstart`: a whole QLoRA job offline, in a few minutes on a laptop CPU.

1. the cached base model (`quickstart_base.ensure_base`: a tiny Llama pretrained on the
   Python standard library; built once, about 2.5 minutes on 2 cores);
2. a downstream task from the same corpus: given a function's docstring, write its `def` line
   (prompt/completion jsonl); held-out examples come from held-out files only;
3. held-out loss of the 4-bit base, and its greedy answers for three held-out docstrings;
4. QLoRA fine-tuning with the same `train()` as `nibbletune train` (NF4 base, LoRA on every
   linear); the recipe has no training loop of its own, for the base either;
5. held-out loss and greedy answers again, and the wall time.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..training.checkpoint import replace_directory
from ..training.config import config_from_dict
from .quickstart_base import (
    PRETRAIN_SECONDS,
    PRETRAIN_STEPS,
    cache_dir,
    documented_functions,
    ensure_base,
    is_held_out,
    stdlib_files,
)

TASK_VERSION = "task-v1"
FINETUNE_STEPS = 250
PROMPT_TEMPLATE = '"""{doc}"""\n'


@dataclass
class Sample:
    """One held-out docstring with its real `def` line and the model's answers."""
    prompt: str
    expected: str
    before: str = ""
    after: str = ""


@dataclass
class QuickstartResult:
    """What `run_quickstart` measured."""
    base_dir: Path
    output_dir: Path
    loss_before: float
    loss_after: float
    samples: list[Sample]
    wall_seconds: float
    train_seconds: float


def function_examples(path: Path) -> list[dict]:
    """prompt/completion rows for every documented function of one source file."""
    return [{"prompt": PROMPT_TEMPLATE.format(doc=doc), "completion": signature + ":"}
            for signature, doc in documented_functions(path)]


def build_task(directory: Path, max_train: int = 4000, max_eval: int = 200,
               seed: int = 0) -> tuple[Path, Path]:
    """train.jsonl / eval.jsonl of docstring -> def line, split by file."""
    train_rows, eval_rows = [], []
    for path in stdlib_files():
        (eval_rows if is_held_out(path) else train_rows).extend(function_examples(path))
    rng = random.Random(seed)
    rng.shuffle(train_rows)
    rng.shuffle(eval_rows)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, rows in (("train.jsonl", train_rows[:max_train]), ("eval.jsonl", eval_rows[:max_eval])):
        (directory / name).write_text("".join(json.dumps(row) + "\n" for row in rows))
        paths.append(directory / name)
    return paths[0], paths[1]


def cached_task() -> tuple[Path, Path]:
    """The task files, built once into the cache (atomically, like the base)."""
    final = cache_dir() / TASK_VERSION
    if not (final / "eval.jsonl").is_file():
        tmp = final.parent / f".tmp-{TASK_VERSION}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        build_task(tmp)
        replace_directory(tmp, final)
    return final / "train.jsonl", final / "eval.jsonl"


def greedy(model, tokenizer, prompt: str, max_new_tokens: int = 40) -> str:
    """Greedy continuation of `prompt`: its first non-blank line (a `def` line ends there)."""
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    model.eval()
    new: list[int] = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            next_id = int(model(input_ids=ids).logits[0, -1].argmax())
            if next_id == tokenizer.eos_token_id:
                break
            new.append(next_id)
            ids = torch.cat([ids, torch.tensor([[next_id]])], dim=1)
            if "\n" in tokenizer.decode(new).lstrip("\n"):
                break
    return tokenizer.decode(new).lstrip("\n").split("\n")[0]


def pick_samples(eval_rows: list[dict], count: int = 3) -> list[Sample]:
    """`count` short but not trivial held-out docstrings (40-100 characters), in file order."""
    fitting = [row for row in eval_rows if 40 <= len(row["prompt"]) <= 100] or eval_rows
    return [Sample(row["prompt"], row["completion"]) for row in fitting[:count]]


def quickstart_config(base_dir: Path, train_path: Path, eval_path: Path, output_dir: Path, steps: int):
    """The fine-tuning job as a `nibbletune train` config (NF4 base, r=16 LoRA on every linear).

    Float32 compute on every machine: at hidden 192 bf16 is slower than float32 even on CPUs with
    native bf16 (measured: 4.6k vs ~3k tokens/s, and bf16's per-shape oneDNN caches grow the
    resident size by ~1 GB over 250 steps of varying lengths), and the figures stay the same
    whichever kind of CPU runs the demo.
    """
    return config_from_dict({
        "model": str(base_dir),
        "data": {"path": str(train_path), "eval_path": str(eval_path), "format": "completion"},
        "output_dir": str(output_dir),
        "quant": {"type": "nf4", "double_quant": True, "blocksize": 64, "compute_dtype": "float32"},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"},
        "train": {"max_steps": steps, "micro_batch_size": 8, "grad_accum": 1, "seq_len": 128, "lr": 3e-3,
                  "scheduler": "cosine", "warmup_steps": 5, "max_grad_norm": 1.0, "seed": 0, "log_every": 1,
                  "eval_every": 0, "save_every": 0, "keep_checkpoints": 1},
    }, source="quickstart")


def run_quickstart(output_dir: str | Path = "runs/quickstart", steps: int = FINETUNE_STEPS,
                   pretrain_steps: int = PRETRAIN_STEPS, pretrain_seconds: float = PRETRAIN_SECONDS,
                   rebuild: bool = False, progress: bool = True) -> QuickstartResult:
    """The whole job; prints a before/after report and returns its figures."""
    from ..data import build_dataset
    from ..loading import load_adapter, load_model, load_tokenizer
    from ..training import train
    from ..training.batches import evaluate
    from ..training.precision import autocast_factory

    started = time.perf_counter()
    output_dir = Path(output_dir)
    base_dir = ensure_base(pretrain_steps, pretrain_seconds, rebuild=rebuild, progress=progress)
    train_path, eval_path = cached_task()
    config = quickstart_config(base_dir, train_path, eval_path, output_dir, steps)
    tokenizer = load_tokenizer(base_dir)
    eval_rows = [json.loads(line) for line in eval_path.read_text().splitlines()]
    samples = pick_samples(eval_rows)
    eval_data = build_dataset(eval_path, tokenizer, config.train.seq_len, format="completion")

    base = load_model(base_dir, config.quant.settings())
    cpu = torch.device("cpu")
    autocast = autocast_factory(cpu, next(base.parameters()).dtype)
    loss_before = evaluate(base, eval_data.examples, 16, eval_data.pad_token_id, cpu, autocast)
    for sample in samples:
        sample.before = greedy(base, tokenizer, sample.prompt)
    del base

    train_started = time.perf_counter()
    shutil.rmtree(output_dir / "checkpoints", ignore_errors=True)  # a fresh demo run, even after a Ctrl-C
    result = train(config, progress=progress)
    train_seconds = time.perf_counter() - train_started

    tuned = load_model(base_dir, config.quant.settings())
    load_adapter(tuned, output_dir)
    tuned.eval()
    for sample in samples:
        sample.after = greedy(tuned, tokenizer, sample.prompt)
    outcome = QuickstartResult(base_dir, output_dir, loss_before, result.eval_loss, samples,
                               time.perf_counter() - started, train_seconds)
    print_report(outcome, len(eval_rows))
    return outcome


def print_report(result: QuickstartResult, eval_count: int) -> None:
    """Held-out loss before/after, the samples, where things are, the wall time."""
    def ppl(loss: float) -> float:
        return math.exp(min(loss, 50))

    loss_line = (f"held-out loss  before {result.loss_before:.3f} (ppl {ppl(result.loss_before):.1f})  ->  "
                 f"after {result.loss_after:.3f} (ppl {ppl(result.loss_after):.1f})")
    lines = [
        "",
        f"task: docstring -> def line; {eval_count} held-out functions from held-out stdlib files",
        loss_line,
        "",
        *(line for sample in result.samples for line in (
            f"docstring: {sample.prompt.strip()}",
            f"  expected: {sample.expected}",
            f"  before:   {sample.before or '(nothing: end of text)'}",
            f"  after:    {sample.after or '(nothing: end of text)'}",
            "")),
        f"adapter (PEFT format): {result.output_dir / 'adapter_model.safetensors'}",
        f"base model: {result.base_dir}",
        f"wall time {result.wall_seconds:.0f} s (fine-tuning {result.train_seconds:.0f} s)",
    ]
    print("\n".join(lines))
    sys.stdout.flush()
