"""Fine-tuning quality: the same short chat fine-tune of SmolLM2-135M with a 16-bit base and three 4-bit bases.

Arms: `method: lora` (the base's linears stay 16-bit, compute dtype auto: bf16 on CPUs with native bf16),
and `method: qlora` with nf4 + double quant, fp4 + double quant, int4 + double quant (blocksize 64). Every
arm runs the same data, LoRA (r 16 on every linear), schedule and seeds through the public
`nibbletune.train`, so only the base's storage differs. Reported per arm: held-out loss at the end and
its perplexity (`nibbletune.evaluation.metrics.perplexity`), mean and std over seeds, and the
training-loss curve of each run (from metrics.jsonl).
"""

from __future__ import annotations

import json
import random
import statistics
from pathlib import Path

ARMS = {
    "LoRA 16-bit": {"method": "lora"},
    "QLoRA NF4+DQ": {"method": "qlora", "quant": {"type": "nf4", "double_quant": True}},
    "QLoRA FP4+DQ": {"method": "qlora", "quant": {"type": "fp4", "double_quant": True}},
    "QLoRA INT4+DQ": {"method": "qlora", "quant": {"type": "int4", "double_quant": True}},
}


def chitchat_conversations(limit: int, seed: int = 0) -> list[dict]:
    """Chit Chat Challenge conversations (package `chitchat-dataset`, MIT) as chat records of 2-4 turns.

    Consecutive messages alternate speakers; each is the sender's utterances joined by spaces. The first
    speaker is the user. Conversations are shuffled with `seed` and the first `limit` kept.
    """
    from chitchat_dataset import Dataset

    records = []
    for conversation in Dataset().values():
        turns = [" ".join(u["text"] for u in message) for message in conversation["messages"]][:4]
        if len(turns) < 2:
            continue
        turns = turns[: len(turns) - len(turns) % 2]
        roles = ["user", "assistant"] * (len(turns) // 2)
        records.append({"messages": [{"role": r, "content": t} for r, t in zip(roles, turns)]})
    random.Random(seed).shuffle(records)
    return records[:limit]


def write_data(directory: Path, train_rows: int, eval_rows: int) -> tuple[Path, Path]:
    """train.jsonl and eval.jsonl (disjoint conversations) under `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    records = chitchat_conversations(train_rows + eval_rows)
    paths = directory / "train.jsonl", directory / "eval.jsonl"
    for path, rows in zip(paths, (records[:train_rows], records[train_rows:])):
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return paths


def run_config(gguf: Path, data: tuple[Path, Path], output_dir: Path, arm: str, seed: int, steps: int,
               batch: int, seq_len: int) -> dict:
    """The `nibbletune train` config of one arm and seed, as a dict."""
    config = {
        "model": str(gguf),
        "data": {"path": str(data[0]), "eval_path": str(data[1]), "format": "chat"},
        "output_dir": str(output_dir),
        "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"},
        "train": {"max_steps": steps, "micro_batch_size": batch, "grad_accum": 1, "seq_len": seq_len, "lr": 1e-3,
                  "warmup_steps": 2, "seed": seed, "log_every": 1, "eval_every": 0, "save_every": 0},
    }
    arm_settings = ARMS[arm]
    config["method"] = arm_settings["method"]
    config["quant"] = {"compute_dtype": "auto", **arm_settings.get("quant", {})}
    if arm_settings["method"] == "qlora":
        config["quant"]["blocksize"] = 64
    return config


def train_one(config: dict) -> dict:
    """Run one fine-tune through `nibbletune.train`; its eval loss, perplexity, losses and wall time."""
    from nibbletune import train
    from nibbletune.evaluation.metrics import perplexity
    from nibbletune.training.config import config_from_dict

    result = train(config_from_dict(config), progress=False)
    return {"eval_loss": result.eval_loss, "eval_ppl": perplexity(result.eval_loss), "losses": result.losses,
            "wall_seconds": result.wall_seconds}


def summarize(runs: dict[str, list[dict]]) -> list[dict]:
    """Mean and std over seeds of eval loss and perplexity per arm, with the perplexity gap to 16-bit LoRA."""
    rows = []
    for arm, results in runs.items():
        losses = [r["eval_loss"] for r in results]
        ppls = [r["eval_ppl"] for r in results]
        rows.append({"arm": arm, "seeds": len(results),
                     "eval_loss_mean": statistics.mean(losses),
                     "eval_loss_std": statistics.stdev(losses) if len(losses) > 1 else 0.0,
                     "eval_ppl_mean": statistics.mean(ppls),
                     "eval_ppl_std": statistics.stdev(ppls) if len(ppls) > 1 else 0.0,
                     "seconds_per_run": statistics.mean(r["wall_seconds"] for r in results)})
    base = next((row["eval_ppl_mean"] for row in rows if row["arm"] == "LoRA 16-bit"), None)
    for row in rows:
        row["ppl_vs_lora16_pct"] = None if base is None else 100 * (row["eval_ppl_mean"] / base - 1)
    return rows
