"""Will it fit? Peak memory of a training run predicted from config.json and the training config.

`estimate_memory` adds named components (`memory_model.py` derives each from the architecture)
and takes the largest of the run's phases, because CPU peak RSS is a high-water mark:

    setup: baseline + weights + the fused-loss check (`Trainer._fused_head`, no grad, one sequence)
    step:  baseline + weights + scratch + adapters, their gradients and optimizer state
           + activations + loss (+ DDP's gradient buckets, FSDP's gathered layers)

Framework baseline. CPU: `CPU_IMPORT_BYTES`, the peak RSS of a fresh process that imports torch,
transformers and the training loop, plus `CPU_RUNTIME_BYTES`, what a training process adds on top
whatever the model (oneDNN's kernels and scratch, the autograd engine, tokenizer and dataset
objects): fitted by least squares with CPU_HEAP_FACTOR over the runs of `benchmarks/plan_accuracy.py`.
CUDA: `CUDA_CONTEXT_BYTES` for the context and cuBLAS workspace, and `CUDA_ALLOCATOR_SLACK` of
the tensors for the caching allocator's rounding and fragmentation (not calibrated here: no GPU).

Under FSDP (`training/distributed.py`) each rank holds 1/world of the decoder layers' 4-bit
storage, adapters, gradients and optimizer state, plus two whole layers being gathered; the
embeddings, final norm and head stay replicated, and activations are per rank (micro_batch_size is
per rank). Under DDP every rank holds the whole model plus gradient buckets as large as the gradients.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field

import torch

from . import memory_model as mm
from .compile import AUTO_MIN_STEPS
from .compile import choose as choose_compile
from .memory_suggestions import Suggestion, suggestions

CPU_IMPORT_BYTES = 249 * 2**20
"""Peak RSS of `python -c "import torch, transformers, nibbletune.training.loop"` (torch 2.13, transformers 5.24,
x86_64 Linux; `benchmarks/plan_accuracy.py` prints it again)."""
CPU_RUNTIME_BYTES = 330 * 2**20
"""What a training process holds beyond its imports whatever the model (module docstring)."""
CPU_HEAP_FACTOR = 1.46
"""CPU RSS per byte of activations: glibc keeps the holes that the forward pass's freed temporaries (float32
norm inputs, rotary halves, pre-dropout outputs) leave between the saved activations. On the toy model a
forward pass grew RSS by 1.73x the bytes `saved_tensors_hooks` reports; fitted over every run of
`benchmarks/plan_accuracy.py` together with CPU_RUNTIME_BYTES."""
CUDA_CONTEXT_BYTES = 600 * 2**20
CUDA_ALLOCATOR_SLACK = 0.10

GPU_MEMORY_GIB = {
    "t4": 16, "v100": 16, "v100-32gb": 32, "a10": 24, "a10g": 24, "l4": 24, "rtx3090": 24, "rtx4090": 24,
    "rtx5090": 32, "a6000": 48, "l40s": 48, "a100": 80, "a100-40gb": 40, "a100-80gb": 80, "h100": 80,
    "h200": 141, "b200": 180,
}
"""Total memory of the GPUs `--device NAME` knows (GiB as sold)."""

@dataclass
class MemoryPlan:
    """The predicted peak of a run, what it is made of, and whether it fits."""

    peak_bytes: int
    components: dict[str, int]
    """Named byte counts; the phase that is not the peak (setup or step) is left out."""
    fits: bool | None
    """peak_bytes <= memory_bytes; None when the device's memory is unknown."""
    suggestions: list[Suggestion] = field(default_factory=list)
    memory_bytes: int | None = None
    device: str = "cpu"
    world_size: int = 1

    def to_dict(self) -> dict:
        """The --json form: peak_bytes, components, fits, suggestions."""
        return {"peak_bytes": self.peak_bytes, "components": dict(self.components), "fits": self.fits,
                "suggestions": [asdict(s) for s in self.suggestions]}


def device_kind(device: str) -> str:
    """"cpu" or "cuda" for a --device value (a GPU name means CUDA); ConfigError for anything else."""
    name = device.lower()
    if name == "cpu":
        return "cpu"
    if name in GPU_MEMORY_GIB or re.fullmatch(r"cuda(:\d+)?", name):
        return "cuda"
    from .config import ConfigError

    raise ConfigError(f"device {device!r}: expected cpu, cuda, cuda:N or a GPU name ({', '.join(GPU_MEMORY_GIB)})")


def device_memory_bytes(device: str) -> int | None:
    """Total memory of `device`: RAM for cpu, the GPU's for cuda[:N] (None without one) or a known GPU name."""
    name = device.lower()
    if name in GPU_MEMORY_GIB:
        return GPU_MEMORY_GIB[name] * 10**9
    if name == "cpu":
        try:
            import psutil

            return int(psutil.virtual_memory().total)
        except ImportError:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if name.startswith("cuda"):
        import torch

        if torch.cuda.is_available():
            return int(torch.cuda.mem_get_info(torch.device(name))[1])
        return None
    return None


def _dtype_bytes(compute_dtype: str, device: str) -> int:
    from ..devices import resolve_compute_dtype

    return resolve_compute_dtype(compute_dtype, device_kind(device)).itemsize


def estimate_memory(model_config, train_config, device: str = "cpu", world_size: int = 1,
                    memory_bytes: int | None = None, suggest: bool = True) -> MemoryPlan:
    """Predict the peak memory per process of training `train_config` (a TrainConfig) on `model_config`
    (a transformers config) before anything large is loaded.

    `device`: "cpu", "cuda", "cuda:N" or a GPU name of `GPU_MEMORY_GIB`; `world_size`: ranks under
    train.distributed ddp or fsdp (ignored for none); `memory_bytes`: the memory to fit in (default:
    the device's total, unknown for CUDA without a GPU). Suggestions come when the plan does not fit.
    """
    device_kind(device)
    arch = mm.Architecture.of(model_config)
    components = _components(arch, train_config, device, world_size)
    peak = sum(components.values())
    memory = memory_bytes if memory_bytes is not None else device_memory_bytes(device)
    fits = None if memory is None else peak <= memory
    plan = MemoryPlan(peak, components, fits, memory_bytes=memory, device=device, world_size=world_size)
    if suggest and fits is False:
        def estimate(changed, ranks: int) -> MemoryPlan:
            return estimate_memory(model_config, changed, device, ranks, memory, suggest=False)

        plan.suggestions = suggestions(train_config, peak, world_size, estimate)
    return plan


def _components(arch: mm.Architecture, config, device: str, world_size: int) -> dict:
    train, lora, quant = config.train, config.lora, config.quant
    b = _dtype_bytes(quant.compute_dtype, device)
    heap = CPU_HEAP_FACTOR if device_kind(device) == "cpu" else 1.0
    ranks = world_size if train.distributed == "fsdp" else 1
    tokens = train.micro_batch_size * train.seq_len
    names = mm.adapted(lora.target_modules)
    linear_numel = sum(o * i for o, i in arch.linear_shapes().values())
    if config.method == "full":
        layer_weights = linear_numel * 4  # float32 master weights
        trainable = mm.full_sizes(arch)
    else:
        layer_weights = (mm.layer_four_bit_bytes(arch, quant.blocksize, quant.double_quant)
                         if config.method == "qlora" else linear_numel * b)
        trainable = mm.adapter_sizes(arch, names, lora.r)
    grads = 4 * sum(trainable)
    out = {}
    if device_kind(device) == "cpu":
        out["framework (imports + runtime)"] = CPU_IMPORT_BYTES + CPU_RUNTIME_BYTES
    else:
        out["framework (CUDA context)"] = CUDA_CONTEXT_BYTES
    out[{"qlora": "4-bit weights (decoder layers)", "lora": "16-bit weights (decoder layers)",
         "full": "float32 weights (decoder layers)"}[config.method]] = -(-arch.layers * layer_weights // ranks)
    out["16-bit weights (embeddings, head, norms)" if config.method != "full" else
        "float32 weights (embeddings, head, norms)"] = mm.sixteen_bit_bytes(arch, 4 if config.method == "full" else b)
    setup = {"loading (one tensor, float32 + compute dtype)": mm.load_bytes(arch, b),
             "fused-loss check (setup)": mm.loss_check_bytes(arch, train.seq_len, b, train.fused_loss)}
    step = {} if config.method == "full" else {"LoRA adapters": -(-grads // ranks)}
    step.update({
        "dequant scratch": mm.scratch_bytes(arch, b) if config.method == "qlora" else 0,
        "weight gradients" if config.method == "full" else "LoRA gradients": -(-grads // ranks),
        f"optimizer state ({train.optimizer})": -(-mm.optimizer_bytes(trainable, train.optimizer) // ranks),
        "activations" + (" (checkpointed)" if train.gradient_checkpointing else ""):
            int(heap * mm.activation_bytes(arch, tokens, b, names, lora.r, lora.dropout > 0,
                                           train.gradient_checkpointing)),
        "loss (fused, chunked)" if train.fused_loss else "loss (plain [tokens, vocab] logits)":
            mm.loss_bytes(arch, tokens, b, train.fused_loss),
    })
    if train.distributed == "ddp" and world_size > 1:
        step["DDP gradient buckets"] = grads
    if ranks > 1:
        step["FSDP gathered layers"] = 2 * (layer_weights + grads // arch.layers)
    steps = train.max_steps or AUTO_MIN_STEPS  # epochs: the data decides; count the run as long
    if choose_compile(train.compile, torch.device(device_kind(device)), steps, train.distributed).enabled:
        step["compile workspace"] = 2 * mm.layer_activation_bytes(arch, tokens, b, names, lora.r, lora.dropout > 0)
    transient = max(setup, key=setup.get)
    if setup[transient] > sum(step.values()):
        out[transient] = setup[transient]
    else:
        out.update(step)
    if device_kind(device) == "cuda":
        out["allocator slack"] = int(CUDA_ALLOCATOR_SLACK * sum(v for k, v in out.items() if "framework" not in k))
    return out


def plan(config, overrides: list[str] | None = None, device: str = "cpu", memory: int | str | None = None,
         world_size: int | None = None) -> MemoryPlan:
    """Predict the peak memory of training `config` (what `nibbletune plan` prints), reading only the model's
    config: a TrainConfig, a YAML path or a dict; `overrides` as --set; `memory` bytes or e.g. "24GiB";
    `world_size` ranks under ddp/fsdp (default: WORLD_SIZE, else 2 for ddp/fsdp)."""
    from ..loading.model_config import load_config as load_model_config
    from ..loading.model_location import resolve_config_dir
    from .config import check_against_model, coerce_config

    config = coerce_config(config, overrides)
    model_config = load_model_config(resolve_config_dir(config.model))
    check_against_model(config, model_config)
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "2" if config.train.distributed != "none" else "1"))
    return estimate_memory(model_config, config, device=device, world_size=world_size,
                           memory_bytes=parse_bytes(memory) if isinstance(memory, str) else memory)


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def parse_bytes(text: str) -> int:
    """'24GiB' -> 25769803776; units B, KB/MB/GB/TB (powers of 10), KiB/MiB/GiB/TiB and K/M/G/T (powers of 2)."""
    from .config import ConfigError

    raw = text.strip().lower().replace(" ", "")
    number = raw.rstrip("kmgtib")
    try:
        value = float(number)
        unit = _UNITS[raw[len(number):]]
    except (ValueError, KeyError):
        raise ConfigError(f"memory {text!r}: expected a size such as 24GiB, 16GB or 512MiB") from None
    if value <= 0:
        raise ConfigError(f"memory {text!r}: expected a positive size")
    return int(value * unit)
