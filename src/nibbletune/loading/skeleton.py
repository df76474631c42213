"""Model skeletons: a transformers model with every parameter on the meta device, no memory spent.

`build_skeleton` builds the model the way `from_pretrained(dir, dtype=compute_dtype)` does
before it reads weights: under `torch.device("meta")` (thread-local; nothing process-wide is
patched) with the compute dtype as default dtype. Parameters and persistent buffers then wait
on meta for the checkpoint. Non-persistent buffers (rotary `inv_freq`, BERT `position_ids`,
Gemma's `embed_scale`) are not in any checkpoint: they are recomputed on the CPU by each
model's own `_init_weights`, the hook transformers 5 itself relies on for them, so they come
out exactly as transformers builds them for that dtype (a bf16 skeleton of a float32 run
would otherwise scale Gemma 3 embeddings by 25.25 instead of sqrt(640) = 25.2982).

Each such buffer is filled with two different sentinels in turn and initialised after each;
any element that changes with the sentinel was never written by `_init_weights` (remote-code
models may not cover their buffers). Those buffers are copied from a second build on the CPU
under transformers' `no_init_weights()`, which computes them in `__init__` and allocates the
parameters as untouched virtual memory only.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

# from_config sets torch's default dtype for the duration of the build, which is process-wide.
_BUILD_LOCK = threading.Lock()


def _non_persistent_buffers(model: nn.Module) -> Iterator[tuple[str, nn.Module, str, torch.Tensor]]:
    """(full name, owner module, attribute, tensor) of every non-persistent buffer, shared ones once."""
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for attr, buffer in module._buffers.items():
            if buffer is None or attr not in module._non_persistent_buffers_set or id(buffer) in seen:
                continue
            seen.add(id(buffer))
            yield (f"{module_name}.{attr}" if module_name else attr), module, attr, buffer


def _construct(cls, config, dtype: torch.dtype, trust_remote_code: bool) -> nn.Module:
    """`cls` built from `config` with `dtype` as default dtype (Auto classes and concrete model classes)."""
    if hasattr(cls, "from_config"):
        kwargs = {"trust_remote_code": trust_remote_code} if hasattr(cls, "_model_mapping") else {}
        return cls.from_config(config, dtype=dtype, **kwargs)
    return cls._from_config(config, dtype=dtype)


def _sentinel(shape: tuple[int, ...], dtype: torch.dtype, which: int) -> torch.Tensor:
    tensor = torch.empty(shape, dtype=dtype)
    if dtype == torch.bool:
        return tensor.fill_(bool(which))
    if tensor.is_floating_point():
        return tensor.fill_(float("nan") if which == 0 else 12345.0)
    info = torch.iinfo(dtype)
    return tensor.fill_(info.min if which == 0 else info.max)


def _run_init_weights(model: nn.Module) -> None:
    """Each module's `_init_weights`, children first, by its nearest enclosing PreTrainedModel (transformers' order).

    Parameters are on meta, so whatever an init does to them costs nothing; an init that cannot
    run on meta is skipped and its buffers are caught by the sentinel check.
    """
    from transformers import PreTrainedModel

    def visit(module: nn.Module, owner) -> None:
        for child in module.children():
            visit(child, child if isinstance(child, PreTrainedModel) else owner)
        try:
            owner._init_weights(module)
        except (NotImplementedError, RuntimeError, TypeError, ValueError):
            pass

    with torch.no_grad():
        visit(model, model)


def _initialised_buffers(model: nn.Module, shapes: dict, which: int) -> dict[str, torch.Tensor]:
    """Put sentinel-filled CPU buffers in place, run the inits, return what they hold."""
    for name, module, attr, _ in list(_non_persistent_buffers(model)):
        module._buffers[attr] = _sentinel(*shapes[name], which)
    _run_init_weights(model)
    return {name: buffer.clone() for name, _, _, buffer in _non_persistent_buffers(model)}


def _unwritten(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> list[str]:
    """Buffers with an element that differs between the two sentinel runs (never written by an init)."""
    unwritten = []
    for name, a in first.items():
        b = second[name]
        same = (a == b) | (torch.isnan(a) & torch.isnan(b)) if a.is_floating_point() else a == b
        if not bool(same.all()):
            unwritten.append(name)
    return unwritten


def _buffers_from_constructor(cls, config, dtype: torch.dtype, trust_remote_code: bool,
                              names: list[str]) -> dict[str, torch.Tensor]:
    """Buffer values as the modules' `__init__` computes them, from a CPU build with uninitialised parameters."""
    from transformers.initialization import no_init_weights

    with no_init_weights():
        full = _construct(cls, copy.deepcopy(config), dtype, trust_remote_code)
    buffers = dict(full.named_buffers())
    return {name: buffers[name].clone() for name in names}


def build_skeleton(config, cls, dtype: torch.dtype, trust_remote_code: bool = False,
                   root: Path | None = None) -> nn.Module:
    """`cls` for `config` with parameters on meta and non-persistent buffers as transformers builds them for `dtype`.

    Raises UnsupportedModelError (naming `root/config.json`) when transformers cannot build it.
    """
    from .model_config import UnsupportedModelError

    config = copy.deepcopy(config)  # from_config records the dtype in it
    try:
        with _BUILD_LOCK, torch.device("meta"):
            model = _construct(cls, config, dtype, trust_remote_code)
    except ValueError as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        where = f"{root / 'config.json'}: " if root is not None else ""
        raise UnsupportedModelError(f"{where}cannot build {getattr(cls, '__name__', cls)} for model_type "
                                    f"{config.model_type!r} ({first_line})") from None
    shapes = {name: (tuple(buffer.shape), buffer.dtype) for name, _, _, buffer in _non_persistent_buffers(model)}
    if shapes:
        first = _initialised_buffers(model, shapes, 0)
        second = _initialised_buffers(model, shapes, 1)
        unwritten = _unwritten(first, second)
        if unwritten:
            owners = {name: (module, attr) for name, module, attr, _ in _non_persistent_buffers(model)}
            with _BUILD_LOCK:
                values = _buffers_from_constructor(cls, config, dtype, trust_remote_code, unwritten)
            for name, value in values.items():
                module, attr = owners[name]
                module._buffers[attr] = value
    return model


def skeleton_from_dir(root: Path, trust_remote_code: bool = False) -> nn.Module:
    """The model described by `root/config.json` (a 4-bit checkpoint's quantization_config ignored), for its structure."""
    from .model_config import load_config, model_class_for

    config = load_config(Path(root), trust_remote_code)
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config
    return build_skeleton(config, model_class_for(config), torch.float32, trust_remote_code, Path(root))
