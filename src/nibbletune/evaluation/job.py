"""One evaluation job: a base model, optionally an adapter, one held-out dataset -> an EvalReport.

`evaluate_adapter` loads the base once, in 4 bits with the QuantSettings the adapter records
(`loading.base_record.recorded_base_quantization`; the base alone: `QuantSettings()` defaults), scores it,
then puts the adapter on the same model with `load_adapter` and scores base+adapter. An adapter
trained on a base without 4-bit linears (method lora) is scored on that base, loaded in 16 bits.
Everything a user can get wrong (files, settings, an adapter for another base) is found
before the first model is scored, and raised as a one-line NibbletuneError.

Scores are deterministic: eval mode (no dropout), greedy decoding, unshuffled batches. They run
on CUDA when it is available, else on the CPU, as training does.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch

from ..data import FORMATS
from ..devices import COMPUTE_DTYPE_NAMES
from ..errors import NibbletuneError
from ..loading.adapter_files import AdapterMismatchError, check_adapter_fits, linear_shapes
from ..loading.base_record import recorded_base_quantization, recorded_compute_dtype
from ..quant import QuantSettings
from .adapter_base import recorded_base_name
from .report import EvalReport
from .scoring import score_model
from .tasks import HeldOutData, held_out_data


class EvaluationError(NibbletuneError, ValueError):
    """An evaluation that cannot run as asked (settings, data without examples, an adapter that does not fit)."""


@dataclass(frozen=True)
class EvalJob:
    """What to evaluate and how. Build it directly, or from a training config with `from_config`."""

    model: str
    """Base model: a local transformers safetensors directory, a GGUF file or a Hugging Face Hub id."""
    data: str
    """Held-out dataset file (jsonl, json, csv, parquet), a directory or a glob, as `build_dataset` reads."""
    adapter: str | None = None
    """Adapter directory (PEFT files); None scores the base alone."""
    format: str = "auto"
    """Row format: auto (from the columns) or one of `nibbletune.data.FORMATS` (text, completion, alpaca, chat, ...)."""
    seq_len: int = 512
    """Tokens per example: longer ones are truncated for the loss; longer prompts are not generated from."""
    batch_size: int = 8
    """Examples per forward pass (loss) and per generate call."""
    limit: int | None = 100
    """Generation examples at most (the first rows with a reference); None: all; 0: no generation. The loss
    always covers every row."""
    max_new_tokens: int = 64
    """Longest greedy continuation, in tokens."""
    compute_dtype: str | None = None
    """Activation dtype of the 4-bit base: None for what the adapter records (else auto), or a name."""

    def __post_init__(self) -> None:
        for name in ("model", "data", "adapter"):
            value = getattr(self, name)
            if isinstance(value, os.PathLike):
                object.__setattr__(self, name, os.fspath(value))
        if self.format != "auto" and self.format not in FORMATS:
            raise EvaluationError(f"format {self.format!r}: expected one of auto, {', '.join(FORMATS)}")
        for name, least in (("seq_len", 2), ("batch_size", 1), ("max_new_tokens", 1)):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < least:
                raise EvaluationError(f"{name} must be an integer of at least {least}, got {getattr(self, name)!r}")
        if self.limit is not None and (not isinstance(self.limit, int) or self.limit < 0):
            raise EvaluationError(f"limit must be 0 or more generation examples (or None for all), got {self.limit!r}")
        if self.compute_dtype is not None and self.compute_dtype not in COMPUTE_DTYPE_NAMES:
            raise EvaluationError(f"compute_dtype {self.compute_dtype!r}: expected one of "
                                  f"{', '.join(COMPUTE_DTYPE_NAMES)}")

    def with_changes(self, **changes) -> EvalJob:
        """A copy with some fields changed; None values are ignored (unset command-line options)."""
        known = {field.name for field in fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise EvaluationError(f"EvalJob has no field {unknown[0]!r} (fields: {', '.join(sorted(known))})")
        return replace(self, **{key: value for key, value in changes.items() if value is not None})

    @classmethod
    def from_config(cls, config, overrides: list[str] | None = None, **changes) -> EvalJob:
        """The job a training config describes: base `model`, adapter `output_dir`, data `data.eval_path` in
        `data.format`, `train.seq_len`, batches of `train.micro_batch_size`; `changes` as in `with_changes`.

        `config`: a TrainConfig or a YAML path (`overrides` are its "dotted.key=value" strings). As in
        `with_changes`, `limit=None` is ignored: for generation on every row use `replace(job, limit=None)`.
        """
        from ..training import TrainConfig, load_config

        source = "config"
        if not isinstance(config, TrainConfig):
            source = str(config)
            config = load_config(config, overrides)
        elif overrides:
            raise EvaluationError("overrides apply to a config file; change a TrainConfig with model_copy")
        if config.method == "full":
            raise EvaluationError(f"{source}: method full writes a whole model to {config.output_dir}, not an "
                                  f"adapter; evaluate it with --model {config.output_dir} --data FILE")
        if not config.data.eval_path:
            raise EvaluationError(f"{source}: 'data.eval_path' is not set; evaluation needs held-out data "
                                  "(--set data.eval_path=FILE)")
        job = cls(model=config.model, data=config.data.eval_path, adapter=config.output_dir,
                  format=config.data.format, seq_len=config.train.seq_len,
                  batch_size=config.train.micro_batch_size)
        return job.with_changes(**changes)


def evaluate_adapter(job: EvalJob, log: Callable[[str], None] | None = None) -> EvalReport:
    """Score the base model, then base+adapter, on the job's held-out data (module docstring).

    `log` receives progress lines and notes (e.g. print to stderr); the notes are also the
    report's `warnings`.
    """
    from ..loading import load_adapter, load_model, load_tokenizer, load_unquantized, read_adapter

    notes: list[str] = []

    def note(text: str) -> None:
        notes.append(text)
        if log:
            log(f"note: {text}")

    adapter = read_adapter(job.adapter) if job.adapter else None  # refuses a bad directory before any loading
    tokenizer = load_tokenizer(job.adapter if job.adapter and _has_tokenizer(job.adapter) else job.model)
    data = held_out_data(job.data, tokenizer, job.format, job.seq_len, job.limit)
    _check_data(data)
    for warning in data.warnings:
        note(f"{job.data}: {warning}")
    quant, four_bit = _base_quantization(job, note)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    quant = quant.resolved(device)
    compute_dtype = quant.torch_compute_dtype(device)
    if four_bit:
        model, described = load_model(job.model, quant), quant.describe()
    else:
        model, described = load_unquantized(job.model, compute_dtype), f"16-bit, compute {quant.compute_dtype}"
    model.to(device).eval()
    if adapter is not None:
        try:
            check_adapter_fits(adapter, linear_shapes(model), job.model)
        except AdapterMismatchError as exc:
            raise EvaluationError(str(exc)) from None
    if log:
        log(f"scoring the base: {len(data.examples)} examples, {len(data.tasks)} to generate")
    base_scores = score_model(model, tokenizer, data, job.batch_size, job.max_new_tokens, compute_dtype)
    adapter_scores = None
    if adapter is not None:
        load_adapter(model, job.adapter)
        model.to(device).eval()
        if log:
            log("scoring base+adapter")
        adapter_scores = score_model(model, tokenizer, data, job.batch_size, job.max_new_tokens, compute_dtype)
    return EvalReport(
        model=job.model, adapter_dir=job.adapter, data=job.data, format=data.format, seq_len=job.seq_len,
        max_new_tokens=job.max_new_tokens, quantization=described, device=device.type,
        examples=len(data.examples), loss_tokens=data.loss_tokens,
        sources=tuple(task.source for task in data.tasks), references=tuple(task.reference for task in data.tasks),
        generation_skipped=data.skipped_tasks, base=base_scores, adapter=adapter_scores, warnings=tuple(notes))


def _check_data(data: HeldOutData) -> None:
    if not data.examples:
        why = f": {data.warnings[0]}" if data.warnings else ""
        raise EvaluationError(f"{data.path}: no example with a supervised token among {data.rows} rows{why}")


def _base_quantization(job: EvalJob, note: Callable[[str], None]) -> tuple[QuantSettings, bool]:
    """The base's QuantSettings and whether its linears are 4-bit (else only the compute dtype applies)."""
    if job.adapter is None:
        return QuantSettings().with_changes(compute_dtype=job.compute_dtype), True
    record = recorded_base_quantization(job.adapter)
    if record.from_defaults:
        note(f"{job.adapter} records no base quantization (no nibbletune.json or training config.yaml); "
             "loading the base as nf4, blocksize 64, double quant")
    named = recorded_base_name(job.adapter)
    if named is not None and not _same_model(named, job.model):
        note(f"{job.adapter} was trained on {named}; evaluating it on {job.model}")
    if record.settings is None:
        note(f"{job.adapter} trained on a base without 4-bit linears: loading {job.model} in 16 bits")
        trained_dtype = recorded_compute_dtype(job.adapter)
        return QuantSettings(compute_dtype=job.compute_dtype or trained_dtype or "auto"), False
    return record.settings.with_changes(compute_dtype=job.compute_dtype), True


def _same_model(first: str, second: str) -> bool:
    """The same path (resolved) or the same Hub id."""
    if Path(first).exists() and Path(second).exists():
        return Path(first).resolve() == Path(second).resolve()
    return first.rstrip("/") == second.rstrip("/")


def _has_tokenizer(path: str) -> bool:
    return (Path(path) / "tokenizer_config.json").is_file() or (Path(path) / "tokenizer.json").is_file()
