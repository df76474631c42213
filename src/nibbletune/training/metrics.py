"""Run metrics: metrics.jsonl, the loss-curve PNG, the progress bar, and `train.report_to`.

metrics.jsonl holds one JSON object per logged step: step, loss, lr, grad_norm, tokens_per_s,
peak_mem_bytes, and eval_loss / eval_perplexity on the steps that ran an eval. On resume the
lines after the checkpoint's step (written by the interrupted run, and about to be redone)
are dropped, so the file reads as one uninterrupted run.

loss_curve.png is drawn from metrics.jsonl at every checkpoint and at the end (rank 0 only), on
a matplotlib `Figure` of its own (Agg canvas, no pyplot state, nothing left open). A plot that
fails warns once and the run goes on. `train.report_to` also sends each record to TensorBoard
(output_dir/tensorboard) or Weights & Biases; their packages are extras, checked at start.
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import sys
from pathlib import Path

import torch

from .config import ConfigError, TrainConfig

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
LOSS_CURVE_FILE = "loss_curve.png"
TENSORBOARD_DIR = "tensorboard"


def peak_memory_bytes(device: torch.device) -> int:
    """Peak allocated CUDA memory, or this process's peak resident set size on CPU.

    On Linux the peak is VmHWM of /proc/self/status: `ru_maxrss` carries over the peak of the
    process image before exec, so a run started from a large parent (a test runner, a notebook)
    would report the parent's peak."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
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
    """Appends metric records to metrics.jsonl, and to the `train.report_to` reporter when there is one."""

    def __init__(self, output_dir: str | Path, resume_step: int = 0, reporter=None):
        self.path = Path(output_dir) / METRICS_FILE
        kept = [r for r in read_metrics(output_dir) if r.get("step", 0) <= resume_step] if resume_step else []
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self._handle = open(self.path, "a")  # noqa: SIM115 (open for the whole run, closed in close())
        self._reporter = reporter

    def write(self, record: dict) -> None:
        self._handle.write(json.dumps(record) + "\n")
        self._handle.flush()
        if self._reporter is not None:
            self._reporter.log(scalars(record), record["step"])

    def close(self) -> None:
        self._handle.close()
        if self._reporter is not None:
            self._reporter.close()


def scalars(record: dict) -> dict[str, float]:
    """A record's finite numbers under reporter tags: train/loss, train/lr, ..., eval/loss, eval/perplexity."""
    tags = {}
    for key, value in record.items():
        if key == "step" or not isinstance(value, (int, float)) or not math.isfinite(value):
            continue
        tags[f"eval/{key.removeprefix('eval_')}" if key.startswith("eval_") else f"train/{key}"] = float(value)
    return tags


# train.report_to -> (module to import, extra that installs it)
_REPORTER_PACKAGES = {"tensorboard": ("torch.utils.tensorboard", "tensorboard"), "wandb": ("wandb", "wandb")}


def check_reporter(report_to: str) -> None:
    """Raise one line now, before any work, when the package `train.report_to` needs is not installed."""
    if report_to not in _REPORTER_PACKAGES:
        return
    module, extra = _REPORTER_PACKAGES[report_to]
    try:
        __import__(module)
    except ImportError:
        raise ConfigError(f"'train.report_to' is {report_to} but the {extra} package is not installed: "
                              f"pip install 'nibbletune[{extra}]'") from None


def open_reporter(config: TrainConfig):
    """The reporter for `train.report_to` (None for none); `check_reporter` has vouched for its package."""
    output_dir = Path(config.output_dir)
    if config.train.report_to == "tensorboard":
        return TensorBoardReporter(output_dir / TENSORBOARD_DIR)
    if config.train.report_to == "wandb":
        return WandbReporter(output_dir, output_dir.name, config.model_dump(mode="json"))
    return None


class TensorBoardReporter:
    """Event files in output_dir/tensorboard (`tensorboard --logdir runs/`)."""

    def __init__(self, directory: Path):
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(str(directory))

    def log(self, tags: dict[str, float], step: int) -> None:
        for tag, value in tags.items():
            self._writer.add_scalar(tag, value, step)

    def close(self) -> None:
        self._writer.close()


class WandbReporter:
    """A Weights & Biases run named after output_dir; WANDB_MODE (offline, disabled), WANDB_PROJECT and the
    other WANDB_* variables work as wandb documents them. Files go under output_dir/wandb."""

    def __init__(self, output_dir: str | Path, run_name: str, config: dict):
        import wandb

        self._wandb = wandb
        wandb.init(project=os.environ.get("WANDB_PROJECT", "nibbletune"), name=run_name, dir=str(output_dir),
                   config=config)

    def log(self, tags: dict[str, float], step: int) -> None:
        self._wandb.log(tags, step=step)

    def close(self) -> None:
        self._wandb.finish()


def progress_bar(total: int, initial: int, enabled: bool):
    """A tqdm bar over optimizer steps (ETA from tqdm), or None when disabled."""
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", file=sys.stderr,
                dynamic_ncols=True, mininterval=0.5)


def format_postfix(loss: float, tokens_per_s: float, peak_bytes: int) -> str:
    return f"loss={loss:.4f} tok/s={tokens_per_s:,.0f} mem={peak_bytes / 2**20:,.0f}MiB"


def plot_loss_curve(output_dir: str | Path, title: str | None = None) -> Path | None:
    """Write output_dir/loss_curve.png (train loss, and eval loss as markers, against step) from metrics.jsonl.

    Returns its path, or None while metrics.jsonl has no records. The file is replaced whole
    (written beside it, then renamed), so a run killed mid-plot leaves the previous curve.
    """
    from matplotlib.figure import Figure  # its own Agg canvas on savefig: no pyplot, no global figure list

    records = [r for r in read_metrics(output_dir) if isinstance(r.get("loss"), (int, float))]
    if not records:
        return None
    figure = Figure(figsize=(7, 4), dpi=100)
    axes = figure.subplots()
    axes.plot([r["step"] for r in records], [r["loss"] for r in records], label="train loss", linewidth=1.2,
              marker="." if len(records) <= 60 else None)  # few logged steps: show where they are
    evals = [r for r in records if "eval_loss" in r]
    if evals:
        axes.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval loss",
                  markersize=4)
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("loss (mean cross-entropy per trained token)")
    if title:
        axes.set_title(title, fontsize=10)
    axes.grid(alpha=0.3)
    axes.legend()
    path = Path(output_dir) / LOSS_CURVE_FILE
    partial = path.with_name(f".{path.name}.partial")
    figure.savefig(partial, format="png", bbox_inches="tight")
    os.replace(partial, path)
    return path


class LossCurve:
    """Redraws loss_curve.png when asked; a failure warns once on stderr and never stops the run."""

    def __init__(self, output_dir: str | Path, title: str | None = None):
        self.output_dir, self.title = Path(output_dir), title
        self.warned = False

    def update(self) -> Path | None:
        try:
            return plot_loss_curve(self.output_dir, self.title)
        except Exception as exc:  # a plot is a convenience: never lose a training run to it
            if not self.warned:
                self.warned = True
                print(f"nibbletune train: warning: {LOSS_CURVE_FILE} not written ({type(exc).__name__}: {exc}); "
                      "training goes on, metrics.jsonl has the numbers", file=sys.stderr, flush=True)
            return None
