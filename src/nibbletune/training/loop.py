"""The one training loop behind `nibbletune train` and `nibbletune quickstart`.

Per optimizer step: `grad_accum` micro-batches, each a forward pass and a backward of its
share of the step's loss. The loss of a step is the mean cross-entropy over every trained
token of all its micro-batches (sum over tokens / trained tokens of the whole step), so
accumulating 4 x 2 sequences gives the gradient of one batch of 8, whatever the padding.
Then: a NaN/inf check (the run stops before the weights are touched), gradient clipping,
the optimizer and scheduler steps, then logging, eval and checkpoints as configured. With
float16 compute the loss is scaled (`precision.py`): a step whose gradients overflowed is
skipped (logged with "skipped": true; the step still counts and consumes its data), and
`MAX_SKIPPED_STEPS` of them in a row stop the run as diverged.

Determinism: the adapters are initialised right after seeding; the data order of epoch e is a
permutation drawn from its own generator seeded with (seed, e); dropout draws from the
global torch RNG, which checkpoints save and restore. A resumed run therefore repeats the
uninterrupted one step for step on CPU.
"""

from __future__ import annotations

import copy
import math
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..data import IGNORE_INDEX, collate
from ..devices import resolve_compute_dtype
from ..errors import NibbletuneError
from . import distributed
from .batches import BatchStream, evaluate, model_inputs, trained_tokens
from .checkpoint import (
    TrainState,
    checkpoint_root,
    latest_checkpoint,
    load_checkpoint,
    read_checkpoint_meta,
    remove_stale_temporaries,
    save_checkpoint,
    save_full_model,
    save_weights,
)
from .compile import choose as choose_compile
from .compile import compile_model, describe_failure, eager, is_compile_failure
from .config import (
    ConfigError,
    TrainConfig,
    apply_overrides,
    check_against_model,
    config_from_dict,
    load_config,
    save_config,
)
from .loss import FusedHead, agrees_with_logits, loss_sum
from .metrics import (
    LossCurve,
    MetricsLog,
    check_reporter,
    format_postfix,
    open_reporter,
    peak_memory_bytes,
    progress_bar,
)
from .optim import build_optimizer
from .precision import MAX_SKIPPED_STEPS, LossScaling, autocast_factory, step_scheduler
from .schedule import build_scheduler
from .setup import prepare_model

_DATA_STREAM_KEYS = ("seed", "seq_len", "packing")


class TrainingDiverged(NibbletuneError, RuntimeError):
    """The loss or gradient became NaN or infinite."""


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT (or a hook) stopped the run after a checkpoint was saved."""

    def __init__(self, message: str, checkpoint: Path | None):
        super().__init__(message)
        self.checkpoint = checkpoint


@dataclass
class TrainHooks:
    """Optional callbacks: `on_model(model)` once the adapters are in place; `on_step(trainer, record)`
    after each optimizer step (may call `trainer.request_stop()`)."""

    on_model: Callable | None = None
    on_step: Callable | None = None


@dataclass
class TrainResult:
    """What a finished run did: steps, last losses, where its output is, how long it took."""

    steps: int
    final_loss: float | None
    eval_loss: float | None
    output_dir: Path
    wall_seconds: float
    losses: list[float] = field(default_factory=list)
    time_capped: bool = False
    """True when train.max_seconds stopped the run before its last step."""


def total_steps(config: TrainConfig, num_examples: int, world_size: int = 1) -> int:
    """Optimizer steps of the run: train.max_steps, or its epochs over `num_examples` split among `world_size` ranks."""
    if config.train.max_steps is not None:
        return config.train.max_steps
    per_epoch = math.ceil(num_examples / (config.train.micro_batch_size * world_size))
    return max(1, math.ceil(config.train.epochs * per_epoch / config.train.grad_accum))


class Trainer:
    """State of one run; `run()` executes it. Build through `train()`."""

    def __init__(self, config: TrainConfig, resume: str | None = None, progress: bool = True,
                 hooks: TrainHooks | None = None):
        self.config, self.resume, self.progress = config, resume, progress
        self.hooks = hooks or TrainHooks()
        self._stop_requested = False

    def request_stop(self) -> None:
        """Save a checkpoint after the current step and stop (what SIGINT does)."""
        self._stop_requested = True

    def _setup(self) -> None:
        from ..data import build_dataset
        from ..loading import load_config as load_model_config
        from ..loading import load_tokenizer

        config = self.config
        self.output_dir = Path(config.output_dir)
        check_reporter(config.train.report_to)  # a missing tensorboard/wandb package: one line before any work
        self.loss_curve = LossCurve(self.output_dir, _curve_title(config))
        check_against_model(config, load_model_config(config.model))
        self.device = distributed.device_for(config.train.distributed, distributed.launched_world()[2])
        self.dist = distributed.start(config, self.device)
        self.compute_dtype = resolve_compute_dtype(config.quant.compute_dtype, self.device)
        self.autocast = autocast_factory(self.device, self.compute_dtype)
        self.loss_scaling = LossScaling(self.compute_dtype, self.device)
        self.skipped_in_a_row = 0
        self.tokenizer = load_tokenizer(config.model)
        build = {"tokenizer": self.tokenizer, "seq_len": config.train.seq_len, "format": config.data.format,
                 "packing": config.train.packing, "on_bad_rows": config.data.on_bad_rows}
        self.train_data = build_dataset(config.data.path, **build)
        if not self.train_data.examples:
            raise ConfigError(f"'data.path' {config.data.path}: no training examples")
        self.pad_token_id = self.train_data.pad_token_id  # pad token, else EOS, else 0 (TokenizerInfo)
        self.eval_data = build_dataset(config.data.eval_path, **build) if config.data.eval_path else None
        for dataset, name in ((self.train_data, "data.path"), (self.eval_data, "data.eval_path")):
            for warning in (getattr(dataset, "warnings", None) or []) if self.dist.is_main else []:
                print(f"nibbletune train: warning ({name}): {warning}", file=sys.stderr)
        self.resume_from = self._resolve_resume()
        earlier = latest_checkpoint(self.output_dir)
        if self.resume_from is None and earlier is not None:
            raise ConfigError(f"output_dir {self.output_dir} holds checkpoints of an earlier run (latest {earlier.name});"
                              " continue it with --resume, or choose another output_dir")
        if self.dist.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(self.output_dir)
            save_config(config, self.output_dir / "config.yaml")
        distributed.check_same_everywhere(self.dist, {
            "config": distributed.config_fingerprint(config),
            "training data": distributed.data_fingerprint(self.train_data.examples)})
        self.model, self.settings = prepare_model(config, self.device)
        distributed.check_same_everywhere(self.dist, {"model": distributed.model_fingerprint(self.model)})
        distributed.shard_model(self.dist, self.model, self.device)
        self.fused = self._fused_head()
        if self.hooks.on_model:
            self.hooks.on_model(self.model)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        distributed.broadcast_trainable(self.dist, self.params)
        self.total_steps = total_steps(config, len(self.train_data.examples), self.dist.world_size)
        self.compiled = self._compile()
        self.optimizer = build_optimizer(config.train.optimizer, self.params, config.train.lr,
                                         config.train.weight_decay, paged_dir=str(self.output_dir))
        self.scheduler = build_scheduler(self.optimizer, self.total_steps, config.train.warmup_steps,
                                         config.train.scheduler)
        self.state = TrainState()
        if self.resume_from is not None:
            self.state = load_checkpoint(self.resume_from, self.model, self.optimizer, self.scheduler,
                                         self.loss_scaling)
            self.model.train()
        self.batches = BatchStream(self.train_data.examples, config.train.micro_batch_size * self.dist.world_size,
                                   config.train.seed, self.pad_token_id, position=self.state.micro_batches)
        self.last_checkpoint = self.resume_from

    def _fused_head(self) -> FusedHead | None:
        """The fused head + loss when configured and it reproduces the model's own loss on a training example."""
        if not self.config.train.fused_loss:
            return None
        fused = FusedHead.of(self.model)
        if fused is not None:
            batch = collate(self.train_data.examples[:1], self.pad_token_id)
            with self.autocast():
                if agrees_with_logits(self.model, fused, model_inputs(batch, self.device), batch["labels"].to(self.device)):
                    return fused
        print(f"nibbletune train: note: {type(self.model).__name__} does not compute its logits as lm_head(hidden); "
              "using the plain (unfused) loss", file=sys.stderr)
        return None

    def _compile(self):
        """The decoder layers compiled in place when train.compile (as `compile.choose` reads it) says so."""
        choice = choose_compile(self.config.train.compile, self.device, self.total_steps,
                                self.config.train.distributed)
        compiled = compile_model(self.model) if choice.enabled else None
        if compiled is not None and self.dist.is_main:
            print(f"nibbletune train: compiling the decoder layers (all but the first) on the first step "
                  f"({choice.reason})", file=sys.stderr, flush=True)
        return compiled

    def _compile_failed(self, error: BaseException) -> None:
        """Go on eagerly after torch.compile failed: drop the compiled layers and the step's partial gradients."""
        self.compiled.revert()
        self.compiled = None
        self.optimizer.zero_grad(set_to_none=True)
        print(f"nibbletune train: warning: torch.compile failed ({describe_failure(error)}); training "
              "eagerly (train.compile: false skips the attempt)", file=sys.stderr, flush=True)

    def _resolve_resume(self) -> Path | None:
        if not self.resume:
            return None
        path = latest_checkpoint(self.config.output_dir) if self.resume == "auto" else Path(self.resume)
        if path is None:
            raise ConfigError(f"--resume: no checkpoint under {Path(self.config.output_dir) / 'checkpoints'}")
        meta = read_checkpoint_meta(path)
        saved, now = meta.get("config", {}), self.config.model_dump(mode="json")
        for key in ("method", "model", "quant", "lora", "data"):
            if saved.get(key) != now[key]:
                raise ConfigError(f"--resume {path}: '{key}' differs from the checkpoint's run; it must not change")
        for key in _DATA_STREAM_KEYS:  # the saved data position counts micro-batches of this stream
            if saved.get("train", {}).get(key) != now["train"][key]:
                raise ConfigError(f"--resume {path}: 'train.{key}' differs from the checkpoint's run "
                                  f"({saved.get('train', {}).get(key)!r}); it must not change")
        saved_rows = saved.get("train", {}).get("micro_batch_size", 0) * meta.get("world_size", 1)
        rows = self.config.train.micro_batch_size * self.dist.world_size
        if saved_rows != rows:
            raise ConfigError(f"--resume {path}: train.micro_batch_size x ranks is {rows} but the checkpoint's run "
                              f"had {saved_rows} sequences per micro-batch over all ranks; keep the product")
        return path

    def _gathered(self) -> tuple[dict, dict] | None:
        """(adapter tensors, optimizer state) gathered whole on a multi-rank run (every rank joins), else None."""
        if not self.dist.enabled or self.settings is None:
            return None
        from ..loading.peft_adapter import adapter_tensors

        return adapter_tensors(self.model), distributed.full_optimizer_state(self.optimizer)

    def _save(self) -> Path:
        gathered = self._gathered()
        path = checkpoint_root(self.output_dir) / f"step-{self.state.step:08d}"
        if self.dist.is_main:
            path = save_checkpoint(self.output_dir, self.state, self.model, self.settings, self.config.model,
                                   self.optimizer, self.scheduler, self.config.model_dump(mode="json"),
                                   self.config.train.keep_checkpoints, self.loss_scaling, gathered,
                                   self.dist.world_size)
            self.loss_curve.update()
        distributed.barrier(self.dist)
        self.last_checkpoint = path
        return path

    def _step(self) -> tuple[float, float | None, int]:
        """One optimizer step; returns (loss, grad_norm or None for a skipped float16 step, input tokens)."""
        distributed.reseed_dropout(self.dist, self.config.train.seed, self.state.step)
        micro = [self._micro_batch() for _ in range(self.config.train.grad_accum)]
        local_tokens = torch.tensor([float(sum(trained_tokens(b["labels"]) for b in micro))], dtype=torch.float64)
        step_tokens = max(1, int(distributed.all_reduce_sum(self.dist, local_tokens.to(self.device)).item()))
        try:
            loss_total, input_tokens = self._accumulate(micro, step_tokens)
        except Exception as error:
            if self.compiled is None or not is_compile_failure(error):
                raise
            self._compile_failed(error)
            loss_total, input_tokens = self._accumulate(micro, step_tokens)
        distributed.sum_gradients(self.dist, self.params)
        totals = torch.stack([loss_total, torch.tensor(float(input_tokens), dtype=torch.float64, device=self.device)])
        loss_value, input_tokens = (float(v) for v in distributed.all_reduce_sum(self.dist, totals))
        input_tokens = int(input_tokens)
        step = self.state.step + 1
        if not math.isfinite(loss_value):
            self._diverged(f"loss is {loss_value} at step {step}")
        self.loss_scaling.unscale(self.optimizer)
        max_norm = self.config.train.max_grad_norm if self.config.train.max_grad_norm > 0 else math.inf
        grad_norm = distributed.gathered_grad_norm(torch.nn.utils.clip_grad_norm_(self.params, max_norm))
        if not math.isfinite(grad_norm) and not self.loss_scaling.enabled:
            self._diverged(f"gradient norm is {grad_norm} at step {step} (loss {loss_value:.4f})")
        self.step_lr = self.optimizer.param_groups[0]["lr"]
        applied = self.loss_scaling.step(self.optimizer)  # float16: skipped when the gradients overflowed
        step_scheduler(self.scheduler, applied)
        self.optimizer.zero_grad(set_to_none=True)
        self.skipped_in_a_row = 0 if applied else self.skipped_in_a_row + 1
        if self.skipped_in_a_row >= MAX_SKIPPED_STEPS:
            self._diverged(f"float16 gradients overflowed on {self.skipped_in_a_row} steps in a row (up to step "
                           f"{step}, loss scale now {self.loss_scaling.scale:g}); use bfloat16 or float32 compute")
        self.state.step = step
        self.state.micro_batches = self.batches.position
        return loss_value, grad_norm if applied else None, input_tokens

    def _accumulate(self, micro: list[dict], step_tokens: int) -> tuple[torch.Tensor, int]:
        """Forward and backward of each micro-batch; returns (the step's loss, still on the device; input tokens)."""
        loss_total = torch.zeros((), dtype=torch.float64, device=self.device)  # read back once per step
        input_tokens = 0
        for batch in micro:
            labels = batch["labels"].to(self.device)
            with self.autocast():
                loss = loss_sum(self.model, model_inputs(batch, self.device), labels, self.fused) / step_tokens
            self.loss_scaling.backward(loss * distributed.backward_scale(self.dist))
            loss_total += loss.detach().double()
            mask = batch.get("attention_mask")
            input_tokens += int(mask.sum()) if mask is not None else batch["input_ids"].numel()
        return loss_total, input_tokens

    def _micro_batch(self) -> dict[str, torch.Tensor]:
        """This rank's rows of the next global micro-batch (the whole micro-batch on one process)."""
        rows, fill = distributed.rank_rows(self.batches.next_indices(), self.dist, self.config.train.micro_batch_size)
        batch = collate([self.train_data.examples[i] for i in rows], self.pad_token_id)
        if fill:
            batch["labels"][-fill:] = IGNORE_INDEX
        return batch

    def _diverged(self, what: str) -> None:
        kept = f"last good checkpoint: {self.last_checkpoint}" if self.last_checkpoint else "no checkpoint was saved"
        raise TrainingDiverged(f"{what}; stopped before updating the weights ({kept}; try a lower train.lr)")

    def _install_sigint(self):
        if threading.current_thread() is not threading.main_thread():
            return None

        def handler(signum, frame):
            if self._stop_requested:  # second Ctrl-C: stop now
                raise KeyboardInterrupt
            self._stop_requested = True
            print("\nnibbletune train: interrupt received, saving a checkpoint after this step "
                  "(Ctrl-C again to quit now)", file=sys.stderr, flush=True)

        return signal.signal(signal.SIGINT, handler)

    def run(self) -> TrainResult:
        """Set up, train to the last step (or a stop), save the adapter; returns what the run did."""
        started = time.perf_counter()
        self.dist = distributed.DistributedRun()
        self.last_checkpoint = None
        try:
            result = self._run(started)
        except Exception as exc:
            if self.dist.enabled and distributed.is_collective_failure(exc):
                raise distributed.rank_failure(self.dist, exc, self.last_checkpoint) from None
            raise
        distributed.stop(self.dist)
        return result

    def _run(self, started: float) -> TrainResult:
        self._setup()
        config = self.config.train
        main = self.dist.is_main
        metrics = MetricsLog(self.output_dir, self.state.step, open_reporter(self.config)) if main else None
        bar = progress_bar(self.total_steps, self.state.step, self.progress and main)
        previous_handler = self._install_sigint()
        losses: list[float] = []
        eval_loss = None
        loop_started = time.perf_counter()
        self.time_capped = False
        try:
            while self.state.step < self.total_steps:
                step_started = time.perf_counter()
                loss, grad_norm, tokens = self._step()
                seconds = time.perf_counter() - step_started
                losses.append(loss)
                peaks = distributed.gather_ints(self.dist, peak_memory_bytes(self.device))
                record = {"step": self.state.step, "loss": loss, "lr": self.step_lr,
                          "grad_norm": grad_norm, "tokens_per_s": tokens / max(seconds, 1e-9),
                          "peak_mem_bytes": max(peaks)}
                if len(peaks) > 1:
                    record["peak_mem_bytes_per_rank"] = peaks
                if self.loss_scaling.enabled:
                    record["loss_scale"] = self.loss_scaling.scale
                    record["skipped"] = grad_norm is None
                capped = bool(config.max_seconds) and time.perf_counter() - loop_started >= config.max_seconds
                self.time_capped, self._stop_requested = distributed.any_rank(self.dist, capped, self._stop_requested)
                last = self.state.step == self.total_steps or self.time_capped
                if self.eval_data is not None and ((config.eval_every and self.state.step % config.eval_every == 0)
                                                   or last):
                    with eager():  # eval's no-grad graphs are not worth compiling
                        eval_loss = evaluate(self.model, self.eval_data.examples, config.micro_batch_size,
                                             self.pad_token_id, self.device, self.autocast, self.fused)
                    record["eval_loss"] = eval_loss
                    record["eval_perplexity"] = math.exp(min(eval_loss, 50.0))
                if metrics is not None and (self.state.step % config.log_every == 0 or last or "eval_loss" in record):
                    metrics.write(record)
                if bar is not None:  # tqdm adds the ETA; the postfix shows on this update's redraw
                    bar.set_postfix_str(format_postfix(loss, record["tokens_per_s"], record["peak_mem_bytes"]),
                                        refresh=False)
                    bar.update(1)
                if self.hooks.on_step:
                    self.hooks.on_step(self, record)
                if config.save_every and self.state.step % config.save_every == 0 and not last:
                    self._save()
                if self._stop_requested and not last:
                    path = self._save()
                    message = (f"interrupted at step {self.state.step}; checkpoint saved to {path} "
                               f"(continue with --resume)")
                    print(f"nibbletune train: {message}", file=sys.stderr, flush=True)
                    raise TrainingInterrupted(message, path)
                if self.time_capped:
                    print(f"nibbletune train: train.max_seconds ({config.max_seconds:g} s) reached after step "
                          f"{self.state.step} of {self.total_steps}; saving as at the end", file=sys.stderr, flush=True)
                    break
        finally:
            if previous_handler is not None:
                signal.signal(signal.SIGINT, previous_handler)
            if bar is not None:
                bar.close()
            if metrics is not None:
                metrics.close()
        self._finish()
        return TrainResult(steps=self.state.step, final_loss=losses[-1] if losses else None, eval_loss=eval_loss,
                           output_dir=self.output_dir, wall_seconds=time.perf_counter() - started, losses=losses,
                           time_capped=self.time_capped)

    def _finish(self) -> None:
        gathered = self._gathered()
        if not self.dist.is_main:
            distributed.barrier(self.dist)
            return
        if self.settings is None:  # method full: a model directory
            save_full_model(self.model, self.tokenizer, self.output_dir)
        else:
            save_weights(self.model, self.output_dir, self.settings, self.config.model,
                         gathered[0] if gathered else None)
        self.loss_curve.update()
        distributed.barrier(self.dist)


def _curve_title(config: TrainConfig) -> str:
    """'quickstart: qlora of SmolLM2-135M-Instruct.Q4_1.gguf' (last path parts of output_dir and model)."""
    return f"{Path(config.output_dir).name}: {config.method} of {Path(config.model).name or config.model}"


def train(config: TrainConfig | str | Path | dict, resume: str | None = None, progress: bool = True,
          hooks: TrainHooks | None = None, overrides: list[str] | None = None) -> TrainResult:
    """Run a training job (what `nibbletune train` runs) and return its result.

    `config`: a TrainConfig, a YAML file path, or a dict of the same keys; `overrides` are
    "dotted.key=value" strings applied to a path or dict (`--set`). `resume` is "auto" (the latest
    checkpoint in output_dir) or a checkpoint path.
    """
    if isinstance(config, (str, Path)):
        config = load_config(config, overrides)
    elif isinstance(config, dict):
        config = config_from_dict(apply_overrides(copy.deepcopy(config), overrides or []))
    elif overrides:
        raise ConfigError("train: overrides apply to a config file or dict; change a TrainConfig with model_copy")
    return Trainer(config, resume=resume, progress=progress, hooks=hooks).run()
