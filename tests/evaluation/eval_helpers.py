"""The toy task of the evaluation tests: any 'reverse: ...' prompt is answered ' omega', learnt in 12 steps."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from train_helpers import make_rows, write_config, write_jsonl

ANSWER = " omega"
SEQ_LEN = 48
BATCH = 4


@dataclass
class TrainedRun:
    base: Path
    config: Path
    output_dir: Path
    eval_path: Path
    eval_loss: float
    """The training loop's own eval loss at the end of the run."""


def toy_rows(count: int, seed: int) -> list[dict]:
    """prompt/completion rows whose completion is always ANSWER."""
    return [{"prompt": row["prompt"], "completion": ANSWER} for row in make_rows(count, seed)]


def train_toy_adapter(base: Path, directory: Path) -> TrainedRun:
    """Train the toy adapter (float32, seeded) into directory/out."""
    import nibbletune

    write_jsonl(directory / "train.jsonl", toy_rows(48, seed=1))
    write_jsonl(directory / "eval.jsonl", toy_rows(12, seed=2))
    config = write_config(directory / "config.yaml", base, directory, directory / "out", max_steps=12, lr=1e-2,
                          eval_every=0, micro_batch_size=BATCH, seq_len=SEQ_LEN)
    result = nibbletune.train(config, progress=False)
    return TrainedRun(base, config, directory / "out", directory / "eval.jsonl", result.eval_loss)
