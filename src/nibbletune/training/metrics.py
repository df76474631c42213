"""Run metrics: metrics.jsonl, optional TensorBoard, the progress bar and a loss-curve PNG.

metrics.jsonl holds one JSON object per logged step: step, loss, lr, grad_norm, tokens_per_s,
peak_mem_bytes, and eval_loss / eval_perplexity on the steps that ran an eval. On resume the
lines after the checkpoint's step (written by the interrupted run, and about to be redone)
are dropped, so the file reads as one uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import math
import resource
import sys
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"


def peak_memory_bytes(device: torch.device) -> int:
    """Peak allocated CUDA memory, or this process's peak resident set size on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def read_metrics(output_dir: str | Path) -> list[dict]:
    """The records of metrics.jsonl; a last line cut short (a run killed mid-write) is left out."""
    path = Path(output_dir) / METRICS_FILE
    if not path.is_file():
        return []
    records = []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    for number, line in enumerate(lines, start=1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number < len(lines):
                raise
    return records


class MetricsLog:
    """Appends metric records to metrics.jsonl (and TensorBoard when it is installed)."""

    def __init__(self, output_dir: str | Path, resume_step: int = 0, tensorboard: bool = True):
        self.path = Path(output_dir) / METRICS_FILE
        kept = [r for r in read_metrics(output_dir) if r.get("step", 0) <= resume_step] if resume_step else []
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self._handle = open(self.path, "a")  # noqa: SIM115 (open for the whole run, closed in close())
        self._writer = _tensorboard_writer(Path(output_dir) / "tensorboard") if tensorboard else None

    def write(self, record: dict) -> None:
        self._handle.write(json.dumps(record) + "\n")
        self._handle.flush()
        if self._writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self._writer.add_scalar(f"train/{key}" if not key.startswith("eval") else f"eval/{key}",
                                            value, record["step"])

    def close(self) -> None:
        self._handle.close()
        if self._writer is not None:
            self._writer.close()


def _tensorboard_writer(directory: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard not installed: metrics.jsonl only
        return None
    return SummaryWriter(str(directory))


def progress_bar(total: int, initial: int, enabled: bool):
    """A tqdm bar over optimizer steps (ETA from tqdm), or None when disabled."""
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", file=sys.stderr,
                dynamic_ncols=True, mininterval=0.5)


def format_postfix(loss: float, tokens_per_s: float, peak_bytes: int) -> str:
    return f"loss={loss:.4f} tok/s={tokens_per_s:,.0f} mem={peak_bytes / 2**20:,.0f}MiB"


def plot_loss_curve(output_dir: str | Path) -> Path | None:
    """loss_curve.png from metrics.jsonl when matplotlib is installed (None otherwise)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    records = read_metrics(output_dir)
    if not records:
        return None
    figure, axes = plt.subplots(figsize=(7, 4))
    axes.plot([r["step"] for r in records], [r["loss"] for r in records], label="train loss")
    evals = [r for r in records if "eval_loss" in r]
    if evals:
        axes.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval loss")
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.legend()
    path = Path(output_dir) / "loss_curve.png"
    figure.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(figure)
    return path
