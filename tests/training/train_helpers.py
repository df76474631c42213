"""Tiny seeded base models, tokenizers and datasets for the training tests (built in seconds)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import yaml

GREEK = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau upsilon"
WORDS = (*GREEK.split(" "), "phi", "chi", "psi", "omega", "red", "green", "blue", "cyan", "magenta", "yellow",
         "black", "white")


def make_rows(count: int, seed: int) -> list[dict]:
    """prompt/completion rows: 'reverse: a b c' -> ' c b a'."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        words = rng.sample(WORDS, rng.randint(2, 5))
        rows.append({"prompt": "reverse: " + " ".join(words) + "\n=>", "completion": " " + " ".join(reversed(words))})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def build_tiny_base(directory: Path, hidden: int = 64, layers: int = 2, max_positions: int = 128) -> Path:
    """A random Llama (seeded) + BPE tokenizer trained on the task's text, saved as a model dir."""
    from nibbletune.recipes.tiny import llama_config, random_llama, save_model_dir, train_tokenizer

    corpus = [r["prompt"] + r["completion"] for r in make_rows(400, seed=99)]
    tokenizer = train_tokenizer(corpus, vocab_size=300)
    config = llama_config(len(tokenizer), hidden_size=hidden, num_layers=layers, heads=4, max_positions=max_positions)
    return save_model_dir(random_llama(config, seed=0), tokenizer, directory)


def write_config(path: Path, model_dir: Path, data_dir: Path, output_dir: Path, **train) -> Path:
    """A small config YAML; keyword arguments override train.* keys."""
    train_section = {"max_steps": 6, "micro_batch_size": 4, "grad_accum": 2, "seq_len": 48, "lr": 5e-3,
                     "warmup_steps": 1, "seed": 7, "log_every": 1, "eval_every": 3, "save_every": 0}
    train_section.update(train)
    raw = {
        "model": str(model_dir),
        "data": {"path": str(data_dir / "train.jsonl"), "eval_path": str(data_dir / "eval.jsonl")},
        "output_dir": str(output_dir),
        "quant": {"type": "nf4", "double_quant": True, "blocksize": 64, "compute_dtype": "float32"},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.1, "target_modules": "all-linear"},
        "train": train_section,
    }
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path
