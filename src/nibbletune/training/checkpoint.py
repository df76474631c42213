"""Training checkpoints: adapter + optimizer + scheduler + RNG + data position, without pickle.

A checkpoint is a directory `output_dir/checkpoints/step-00000012/` holding

* the trained weights: the adapter in PEFT format (`adapter_model.safetensors`, `adapter_config.json`,
  by `save_adapter`), or for method full every weight (`model.safetensors`, safetensors' own
  `save_model`, which keeps tied weights once);
* `trainer_state.safetensors`: every tensor of the optimizer state (`optimizer.<param index>.<name>`)
  and the torch RNG states (`rng.torch`, `rng.cuda.<device>`);
* `trainer_state.json`: step, data position, optimizer param groups and non-tensor state,
  scheduler state, float16 loss-scaler state, Python and NumPy RNG states, and the config of the run;
* `loftq.json` when the adapters were initialised with LoftQ (`modules/loftq.py`).

It is written into a hidden temporary directory, fsynced, and renamed into place with
`os.replace`, so a run killed at any moment leaves either the previous set of checkpoints or
the new one, never a half-written directory that `latest_checkpoint` would pick.

A run on several ranks writes the same files from rank 0, with its sharded adapters and optimizer
state gathered whole first, and restores them into whatever sharding the resuming run uses; so one
checkpoint resumes on any world size (`distributed.py`).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from safetensors.torch import load_model as load_model_file
from safetensors.torch import save_model as save_model_file

from ..errors import FormatError
from .distributed import shard_like, shard_optimizer_state

STATE_TENSORS = "trainer_state.safetensors"
STATE_JSON = "trainer_state.json"
FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass
class TrainState:
    """Where a run is: optimizer steps done and micro-batches consumed from the data stream."""

    step: int = 0
    micro_batches: int = 0


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints under output_dir/checkpoints, oldest first."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name))
             and (p / STATE_JSON).is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def remove_stale_temporaries(output_dir: str | Path) -> None:
    """Delete temporary directories left by a run killed while writing a checkpoint."""
    root = checkpoint_root(output_dir)
    if root.is_dir():
        for path in root.iterdir():
            if path.name.startswith(".tmp-") or path.name.startswith(".old-"):
                shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------------------- RNG


def rng_state() -> tuple[dict, dict[str, torch.Tensor]]:
    """(JSON part, tensor part) of the Python, NumPy and torch RNG states."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    json_part = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for index, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{index}"] = state
    return json_part, tensors


def set_rng_state(json_part: dict, tensors: dict[str, torch.Tensor]) -> None:
    version, internal, gauss = json_part["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = json_part["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["rng.torch"])
    cuda = sorted(k for k in tensors if k.startswith("rng.cuda."))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda])


# ---------------------------------------------------------------------------- optimizer state


def split_optimizer_state(state_dict: dict) -> tuple[dict, dict[str, torch.Tensor]]:
    """torch optimizer state_dict -> (JSON-able dict, flat tensors)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict] = {}
    for index, entry in state_dict["state"].items():
        scalars[str(index)] = {}
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[str(index)][name] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in group.items()}
              for group in state_dict["param_groups"]]
    return {"param_groups": groups, "scalars": scalars}, tensors


def join_optimizer_state(json_part: dict, tensors: dict[str, torch.Tensor]) -> dict:
    state: dict[int, dict] = {int(i): dict(values) for i, values in json_part["scalars"].items()}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in group.items()} for group in json_part["param_groups"]]
    return {"state": state, "param_groups": groups}


# ---------------------------------------------------------------------------- save / load


def _fsync_tree(path: Path) -> None:
    for file in path.rglob("*"):
        if file.is_file():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())
    _fsync_dir(path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_directory(staging: Path, final: Path) -> None:
    """Rename the finished `staging` directory to `final`; an existing `final` is moved aside first,
    so `final` is always either the old directory or the new one, then the old one is deleted."""
    if final.exists():
        old = final.parent / f".old-{final.name}-{os.getpid()}"
        os.replace(final, old)
        os.replace(staging, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, final)


def write_loftq_note(model, directory: str | Path) -> None:
    """Write `loftq.json` into an adapter directory when `model`'s adapters were LoftQ-initialised."""
    from ..modules.loftq import LOFTQ_NOTE

    note = getattr(model, "loftq_note", None)
    if note is not None:
        (Path(directory) / LOFTQ_NOTE).write_text(json.dumps(note, indent=2) + "\n")


FULL_WEIGHTS = "model.safetensors"


def save_weights(model, directory: str | Path, settings, base_model: str,
                 adapter: dict[str, torch.Tensor] | None = None) -> None:
    """The trained weights into `directory`: the adapter (+ loftq.json) with LoRA settings, else every weight.

    `adapter`: the adapter tensors already gathered (`adapter_tensors`), as a sharded run passes them.
    """
    if settings is None:
        save_model_file(model, str(Path(directory) / FULL_WEIGHTS), metadata={"format": "pt"})
        return
    from ..loading.peft_adapter import save_adapter

    save_adapter(model, directory, settings, base_model, tensors=adapter)
    write_loftq_note(model, directory)


def save_full_model(model, tokenizer, out_dir: str | Path) -> None:
    """A fully trained model as a transformers directory (config, safetensors, tokenizer) in `out_dir`.

    Written into a temporary directory beside it, then each file moved in with os.replace, so a
    kill leaves the previous files or the new ones; other files in `out_dir` are left alone.
    """
    out_dir = Path(out_dir)
    tmp = out_dir.parent / f".tmp-{out_dir.name}-model-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        _fsync_tree(tmp)
        out_dir.mkdir(parents=True, exist_ok=True)
        for path in sorted(tmp.iterdir()):
            os.replace(path, out_dir / path.name)
        _fsync_dir(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_checkpoint(output_dir: str | Path, state: TrainState, model, settings, base_model: str,
                    optimizer, scheduler, config_dict: dict, keep: int, loss_scaling=None,
                    gathered: tuple[dict, dict] | None = None, world_size: int = 1) -> Path:
    """Write a checkpoint for `state.step` atomically; keep the newest `keep` (0 = all).

    `settings`: the run's LoraSettings, or None for method full (every weight is saved).
    `loss_scaling`: the loop's `precision.LossScaling`, whose float16 scaler state is saved too.
    `gathered`: (adapter tensors, optimizer state_dict) already gathered whole from a sharded run;
    `world_size`: the ranks that trained it (the data position counts their global micro-batches).
    """
    root = checkpoint_root(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{state.step:08d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    adapter, optimizer_state = gathered if gathered is not None else (None, optimizer.state_dict())
    save_weights(model, tmp, settings, base_model, adapter)
    optimizer_json, tensors = split_optimizer_state(optimizer_state)
    rng_json, rng_tensors = rng_state()
    save_file({**tensors, **rng_tensors}, str(tmp / STATE_TENSORS))
    meta = {
        "format": FORMAT_VERSION,
        "step": state.step,
        "micro_batches": state.micro_batches,
        "world_size": world_size,
        "optimizer": optimizer_json,
        "scheduler": scheduler.state_dict(),
        "grad_scaler": loss_scaling.state_dict() if loss_scaling is not None else None,
        "rng": rng_json,
        "config": config_dict,
    }
    (tmp / STATE_JSON).write_text(json.dumps(meta))
    _fsync_tree(tmp)
    replace_directory(tmp, final)  # final exists when a step is saved twice (interrupt after a periodic save)
    _fsync_dir(root)
    if keep > 0:
        for stale in list_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(stale, ignore_errors=True)
    return final


def read_checkpoint_meta(path: str | Path) -> dict:
    path = Path(path)
    try:
        meta = json.loads((path / STATE_JSON).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise FormatError(f"{path}: not a nibbletune checkpoint ({exc})") from None
    if meta.get("format") != FORMAT_VERSION:
        raise FormatError(f"{path / STATE_JSON}: format {meta.get('format')!r} unknown (expected {FORMAT_VERSION})")
    return meta


def restore_adapter_weights(model, path: Path) -> None:
    """Copy the adapter tensors of a checkpoint into the model's existing LoRA layers, exactly."""
    from ..loading.adapter_files import KEY_PREFIX, WEIGHTS_NAME
    from ..modules import lora_layers

    tensors = load_file(str(path / WEIGHTS_NAME))
    with torch.no_grad():
        for module_path, layer in lora_layers(model).items():
            for name, param in layer.adapter_state_dict().items():
                key = f"{KEY_PREFIX}{module_path}.{name}"
                if key not in tensors or tensors[key].shape != param.shape:
                    raise FormatError(f"{path / WEIGHTS_NAME}: no tensor '{key}' of shape {list(param.shape)}")
                param.copy_(shard_like(tensors[key], param))


def load_checkpoint(path: str | Path, model, optimizer, scheduler, loss_scaling=None) -> TrainState:
    """Restore adapter weights, optimizer, scheduler, loss scaler and RNG from a checkpoint; return the state."""
    path = Path(path)
    meta = read_checkpoint_meta(path)
    if (path / FULL_WEIGHTS).is_file():
        load_model_file(model, str(path / FULL_WEIGHTS))  # every weight, tied ones re-tied
    else:
        restore_adapter_weights(model, path)
    tensors = load_file(str(path / STATE_TENSORS))
    params = [p for group in optimizer.param_groups for p in group["params"]]
    optimizer.load_state_dict(shard_optimizer_state(join_optimizer_state(meta["optimizer"], tensors), params))
    scheduler.load_state_dict(meta["scheduler"])
    if loss_scaling is not None:
        loss_scaling.load_state_dict(meta.get("grad_scaler"))
    set_rng_state(meta["rng"], tensors)
    return TrainState(step=meta["step"], micro_batches=meta["micro_batches"])
