"""The training config: typed pydantic models, read from YAML with `--set key=value` overrides.

Every field has a description; `nibbletune train --help` prints them (see `describe_keys`).
Unknown keys, wrong types and impossible values are refused before any work, as one
`ConfigError` line naming the dotted key and what is allowed. Checks that need the model's
own config (sequence length against `max_position_embeddings`) run in `check_against_model`
as soon as that config is read, still before any weights are loaded.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..errors import NibbletuneError
from ..modules import LoraSettings
from ..quant import QuantSettings


class ConfigError(NibbletuneError, ValueError):
    """A training config key that is unknown, of the wrong type, or out of its allowed range."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Section):
    """Where the examples come from."""

    path: str = Field(description="training file (jsonl, json, csv, parquet) or a directory of them")
    eval_path: str | None = Field(None, description="held-out file for eval loss and perplexity; none to skip eval")
    format: Literal["auto", "text", "completion", "alpaca", "chat", "sharegpt"] = Field(
        "auto", description="record layout; auto detects it from the columns")
    on_bad_rows: Literal["error", "skip"] = Field(
        "error", description="a row that cannot be read or used (invalid or truncated JSON, missing or mistyped "
        "columns, refused by the chat template): error stops, naming its file and line or byte offset; skip leaves "
        "it out, counts it and warns with the first few")


class QuantConfig(_Section):
    """How the frozen base weights are stored."""

    type: Literal["nf4", "fp4", "int4"] = Field(
        "nf4", description="4-bit code book: nf4, fp4, or int4 (uniform grid; no bitsandbytes checkpoint)")
    double_quant: bool = Field(True, description="quantize the per-block absmax values to 8 bits too")
    blocksize: Literal[64, 128, 256, 512, 1024, 2048, 4096] = Field(
        64, description="weights per absmax scale")
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="dtype of activations and dequantized weights; auto = bf16 on CUDA or CPUs with "
        "native bf16, else float32")
    skip_modules: list[str] = Field(
        default_factory=list, description="linears kept in 16 bits: a pattern names a module path it ends with, or "
        "matches it from the start as a regex (transformers' llm_int8_skip_modules rule), e.g. [down_proj]")

    def settings(self) -> QuantSettings:
        """This section as the QuantSettings that load_model, the adapter record and merge share."""
        return QuantSettings(quant_type=self.type, blocksize=self.blocksize, double_quant=self.double_quant,
                             compute_dtype=self.compute_dtype, skip_modules=tuple(self.skip_modules))


class LoraConfig(_Section):
    """The trainable low-rank adapters."""

    r: int = Field(16, gt=0, description="adapter rank")
    alpha: float = Field(32.0, gt=0, description="scaling numerator: the update is (alpha / r) * B A")
    dropout: float = Field(0.05, ge=0, lt=1, description="dropout on the adapter input")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="linear names to adapt (e.g. [q_proj, v_proj]) or all-linear")
    use_rslora: bool = Field(False, description="rank-stabilised scaling alpha / sqrt(r)")
    use_dora: bool = Field(False, description="weight-decomposed LoRA (DoRA) magnitude vector")
    init: Literal["default", "gaussian", "loftq"] = Field(
        "default", description="adapter initialisation: default (Kaiming A, zero B), gaussian, or loftq "
        "(base quantized as Q(W - scaling B A) while loading; the adapter then needs that base, see loftq.json)")
    loftq_iters: int = Field(1, gt=0, description="alternating quantize/SVD rounds of lora.init loftq")

    def settings(self) -> LoraSettings:
        """This section as the LoraSettings that apply_lora and the adapter files share."""
        return LoraSettings(r=self.r, alpha=self.alpha, dropout=self.dropout, target_modules=self.target_modules,
                            use_rslora=self.use_rslora, use_dora=self.use_dora, init=self.init,
                            loftq_iters=self.loftq_iters)


class TrainSection(_Section):
    """The optimisation loop."""

    max_steps: int | None = Field(None, gt=0, description="optimizer steps to run (give this or epochs)")
    epochs: float | None = Field(None, gt=0, description="passes over the training data (give this or max_steps)")
    micro_batch_size: int = Field(4, gt=0, description="sequences per forward pass")
    grad_accum: int = Field(1, gt=0, description="micro-batches per optimizer step")
    seq_len: int = Field(512, gt=1, description="tokens per sequence (truncated or packed to this)")
    lr: float = Field(2e-4, gt=0, description="peak learning rate")
    scheduler: Literal["cosine", "linear", "constant"] = Field(
        "cosine", description="learning-rate decay after warmup (to 0 for cosine and linear)")
    warmup_steps: int = Field(0, ge=0, description="steps of linear warmup from 0 to lr")
    weight_decay: float = Field(0.0, ge=0, description="decoupled (AdamW) weight decay")
    max_grad_norm: float = Field(1.0, ge=0, description="clip the global gradient norm to this; 0 disables")
    optimizer: Literal["adamw", "adamw8bit", "paged_adamw"] = Field(
        "adamw", description="adamw; adamw8bit (blockwise 8-bit states); paged_adamw (states in a file, "
        "paged per step)")
    packing: bool = Field(False, description="pack several examples into each sequence")
    gradient_checkpointing: bool = Field(False, description="recompute activations in backward to save memory")
    fused_loss: bool = Field(True, description="compute the output head and the loss together, a chunk of tokens "
                             "at a time, never the full [tokens, vocab] logits (checked against the plain loss "
                             "at start; models that compute logits otherwise fall back)")
    compile: Literal["auto"] | bool = Field(
        "auto", description="torch.compile each decoder layer (once for all of them; cached on disk): true, false, "
        "or auto (on CUDA for runs of 300 steps or more; off on the CPU, where it is no faster). Falls back to "
        "eager with one warning where compiling fails")
    seed: int = Field(0, description="seed for adapter init, dropout and data order")
    eval_every: int = Field(0, ge=0, description="steps between eval-loss runs (and at the end); 0 = only at the end")
    save_every: int = Field(0, ge=0, description="steps between checkpoints; 0 = only on interrupt")
    log_every: int = Field(1, gt=0, description="steps between metrics.jsonl lines")
    keep_checkpoints: int = Field(3, ge=0, description="newest checkpoints kept; 0 keeps all")
    distributed: Literal["none", "ddp", "fsdp"] = Field(
        "none", description="none: one process; ddp: every rank holds the 4-bit base, adapter gradients are "
        "summed; fsdp: decoder layers (4-bit storage, adapters, optimizer state) sharded with FSDP2. Launch "
        "with torchrun; micro_batch_size is per rank")
    distributed_timeout_s: float = Field(600, gt=0, description="seconds a collective waits for the other ranks "
                                         "before the run fails (a dead or hung rank)")
    max_seconds: float = Field(0, ge=0, description="stop after this much training time and save as at the end "
                               "(the schedule still follows max_steps); 0 = no limit")
    report_to: Literal["none", "tensorboard", "wandb"] = Field(
        "none", description="where metrics go besides metrics.jsonl and loss_curve.png: none; tensorboard "
        "(events in output_dir/tensorboard; pip install 'nibbletune[tensorboard]'); wandb (Weights & Biases, "
        "WANDB_MODE=offline works; pip install 'nibbletune[wandb]')")

    @field_validator("compile", mode="before")
    @classmethod
    def _compile_choice(cls, value):
        if isinstance(value, bool):
            return value
        choices = {"auto": "auto", "true": True, "false": False}
        if isinstance(value, str) and value.lower() in choices:
            return choices[value.lower()]
        raise ValueError(f"must be auto, true or false (got {value!r})")

    @model_validator(mode="after")
    def _length(self) -> TrainSection:
        if (self.max_steps is None) == (self.epochs is None):
            raise ValueError("give exactly one of train.max_steps and train.epochs")
        if self.compile is True and self.distributed == "fsdp":
            raise ValueError("train.compile: true does not work with train.distributed: fsdp yet; use ddp, or "
                             "compile: auto (which leaves fsdp runs eager)")
        return self


METHODS = ("qlora", "lora", "full")
_QUANT_FORMAT_KEYS = ("type", "double_quant", "blocksize", "skip_modules")


class TrainConfig(_Section):
    """A whole fine-tuning run."""

    method: Literal["qlora", "lora", "full"] = Field(
        "qlora", description="qlora: LoRA adapters on a frozen 4-bit base; lora: the same on a frozen 16-bit base; "
        "full: every weight trains (float32 master weights, no adapters); its output is a model directory")
    model: str = Field(description="base model: a local transformers safetensors directory or a Hugging Face Hub id")
    data: DataConfig = Field(description="training and eval data")
    output_dir: str = Field(description="where the adapter, checkpoints and metrics go")
    quant: QuantConfig = Field(default_factory=QuantConfig, description="4-bit storage of the base")
    lora: LoraConfig = Field(default_factory=LoraConfig, description="adapters")
    train: TrainSection = Field(description="optimisation loop")

    @model_validator(mode="after")
    def _method_sections(self) -> TrainConfig:
        if self.method != "qlora":
            given = [key for key in _QUANT_FORMAT_KEYS if key in self.quant.model_fields_set]
            if given:
                raise ValueError(f"'quant.{given[0]}' applies to method qlora only (method is {self.method}; "
                                 "quant.compute_dtype applies to every method)")
            if self.lora.init == "loftq":
                raise ValueError("'lora.init' loftq needs method qlora (it chooses the 4-bit base)")
        if self.method == "full" and self.lora.model_fields_set:
            raise ValueError("the 'lora' section applies to methods qlora and lora; method full trains every weight")
        return self


def _one_line(exc: ValidationError, source: str) -> str:
    error = exc.errors()[0]
    key = ".".join(str(part) for part in error["loc"])
    if error["type"] == "extra_forbidden":
        section = _section_at(error["loc"][:-1])
        allowed = ", ".join(section.model_fields) if section else "?"
        return f"{source}: unknown key '{key}' (allowed here: {allowed})"
    if error["type"] == "missing":
        return f"{source}: missing key '{key}'"
    message = error["msg"]
    if error["type"] == "value_error":
        message = message.removeprefix("Value error, ")
        return f"{source}: {message}" if not key else f"{source}: '{key}': {message}"
    got = error.get("input")
    return f"{source}: '{key}' {message[0].lower()}{message[1:]} (got {got!r})"


def _section_at(loc: tuple) -> type[BaseModel] | None:
    model: type[BaseModel] = TrainConfig
    for part in loc:
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return model


def parse_override(item: str) -> tuple[list[str], Any]:
    """'train.lr=1e-4' -> (['train', 'lr'], 1e-4); the value is read as a YAML scalar."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected key=value, e.g. train.lr=1e-4")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r}: expected a dotted key such as train.lr")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        raise ConfigError(f"override {item!r}: value is not a YAML scalar") from None
    if isinstance(value, str):
        value = _number_or_text(value)
    return key.split("."), value


def _number_or_text(text: str) -> Any:
    """YAML 1.1 reads '1e-4' as text; read such strings as numbers."""
    try:
        number = float(text)
    except ValueError:
        return text
    return number if math.isfinite(number) else text


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Set each 'dotted.key=value' in a nested dict (sections are created as needed)."""
    for item in overrides:
        path, value = parse_override(item)
        node = raw
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: '{part}' is a value, not a section")
            node = child
        node[path[-1]] = value
    return raw


def config_from_dict(raw: dict, source: str = "config") -> TrainConfig:
    """Validate a nested dict as a TrainConfig, raising a one-line ConfigError."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of keys at the top level")
    _numbers_in_place(raw)
    try:
        return TrainConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_one_line(exc, source)) from None


def _numbers_in_place(node: dict) -> None:
    for key, value in node.items():
        if isinstance(value, dict):
            _numbers_in_place(value)
        elif isinstance(value, str) and key in _FLOAT_KEYS:
            node[key] = _number_or_text(value)


_FLOAT_KEYS = {"lr", "weight_decay", "max_grad_norm", "alpha", "dropout", "epochs"}


def load_config(yaml_path: str | Path | None, overrides: list[str] | None = None) -> TrainConfig:
    """Read a YAML config (or start empty when None), apply overrides, validate."""
    raw: dict = {}
    source = "config"
    if yaml_path is not None:
        path = Path(yaml_path)
        source = str(path)
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read ({exc.strerror})") from None
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark else ""
            raise ConfigError(f"{path}: invalid YAML{where}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of keys at the top level")
    apply_overrides(raw, overrides or [])
    return config_from_dict(raw, source)


def check_against_model(config: TrainConfig, model_config) -> None:
    """Checks that need the base model's config: sequence length and adapter targets."""
    if config.lora.init == "loftq" and getattr(model_config, "quantization_config", None) is not None:
        raise ConfigError(f"'lora.init' loftq needs the full-precision weights, but {config.model} is a "
                          "pre-quantized 4-bit checkpoint; use its full-precision original")
    limit = getattr(model_config, "max_position_embeddings", None)
    if limit is not None and config.train.seq_len > limit:
        raise ConfigError(
            f"'train.seq_len' is {config.train.seq_len} but the model allows at most {limit} "
            "(max_position_embeddings)"
        )


def save_config(config: TrainConfig, path: str | Path) -> None:
    """Write the config as YAML (the form `load_config` reads)."""
    Path(path).write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))


def describe_keys() -> list[tuple[str, str, str]]:
    """(dotted key, default, description) for every field, for --help and docs."""
    rows: list[tuple[str, str, str]] = []

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            annotation = field.annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                walk(annotation, f"{prefix}{name}.")
                continue
            default = "required" if field.is_required() else repr(field.get_default(call_default_factory=True))
            rows.append((f"{prefix}{name}", default, field.description or ""))

    walk(TrainConfig, "")
    return rows


def coerce_config(config, overrides: list[str] | None = None) -> TrainConfig:
    """A TrainConfig from a TrainConfig, a YAML path or a dict of the same keys, with `overrides` ("dotted.key=value",
    as --set) applied to a path or dict."""
    import copy

    if isinstance(config, (str, Path)):
        return load_config(config, overrides)
    if isinstance(config, dict):
        return config_from_dict(apply_overrides(copy.deepcopy(config), overrides or []))
    if overrides:
        raise ConfigError("overrides apply to a config file or dict; change a TrainConfig with model_copy")
    return config
