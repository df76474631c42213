"""Training on several processes: torch.distributed start-up, per-rank data, gradient sync and FSDP2 sharding.

Launch with `torchrun --nproc-per-node N -m nibbletune train CONFIG.yaml` (or `--nnodes/--rdzv-*`,
`srun`, `accelerate launch`: anything that sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT) and `train.distributed: ddp | fsdp`. The backend is NCCL on CUDA and gloo on CPU.

Batches. `train.micro_batch_size` is per rank, so a step trains on micro_batch_size x world_size x
grad_accum sequences. Every rank draws the same seeded global micro-batch of micro_batch_size x
world_size rows (`BatchStream`) and keeps rows [rank*mbs, (rank+1)*mbs); a short last micro-batch
of an epoch is filled with copies whose labels are masked, so every rank runs every collective and
the fill adds nothing to the loss. Each rank divides its token-loss sum by the trained tokens of the
whole step over all ranks, and gradients are summed across ranks (not averaged), so N ranks compute
the gradient one process computes with micro_batch_size x N, up to float reduction order. The
checkpoint's data position counts global micro-batches, so a run resumes exactly on another world
size that keeps micro_batch_size x world_size.

Strategies.
* ddp: every rank holds the whole 4-bit base. After the backward of a step's last micro-batch the
  adapter gradients, the only trainable tensors, are summed in flat buckets of `BUCKET_BYTES`; the
  frozen base never crosses the wire.
* fsdp: each decoder layer is wrapped by FSDP2 `fully_shard`. Its 4-bit storage (packed codes,
  absmax, nested absmax) is re-registered as frozen uint8/float32 parameters, so FSDP shards it
  along dim 0 together with the layer's adapters, and gathers it just in time for the layer's
  forward and backward. FSDP2 gathers a group of mixed dtypes as raw bytes, so a code byte that
  would read as NaN in bfloat16 (bitsandbytes #1945) arrives unchanged. Optimizer state lives on the
  sharded adapters, so it is sharded too. The decoder (the module holding the layers) is the FSDP
  root; its own parameters (embeddings, final norm) and the head stay replicated: they may be tied,
  and the fused loss reads the head's weight directly.

Dropout draws from the global torch generator, reseeded each step from (seed, rank, step), so a
resumed run repeats the uninterrupted one on any world size without saving per-rank generators.

Failure. The process group is created with `train.distributed_timeout_s`, so a collective waiting
for a dead or hung rank raises instead of hanging; `RankFailure` turns that into one line that
names the ranks on this host whose processes are gone. torchrun then stops the other ranks.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
import socket
import time
import zlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..errors import NibbletuneError
from .config import ConfigError, TrainConfig

BUCKET_BYTES = 25 * 2**20
STRATEGIES = ("none", "ddp", "fsdp")
_STORAGE_NAMES = ("packed_codes", "absmax", "nested_absmax")
_COLLECTIVE_ERROR = re.compile(r"connection (closed|reset|refused)|closed by peer|reset by peer|broken pipe|"
                               r"timed out|timeout|watchdog|socket", re.IGNORECASE)


class RankFailure(NibbletuneError, RuntimeError):
    """A collective failed or timed out: another rank died or stopped answering."""


@dataclass(frozen=True)
class DistributedRun:
    """This process's place in the job: strategy, rank, world size, and every rank's (host, pid)."""

    strategy: str = "none"
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    timeout_s: float = 600.0
    peers: tuple[tuple[str, int], ...] = ()
    device: str = "cpu"
    """Where collective tensors live: the rank's GPU under NCCL, else the CPU."""

    @property
    def enabled(self) -> bool:
        """True when a process group is in use (ddp or fsdp, any world size)."""
        return self.strategy != "none"

    @property
    def is_main(self) -> bool:
        """True on rank 0, the rank that writes files and logs."""
        return self.rank == 0


def launched_world() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from the launcher's environment; (0, 1, 0) without one."""
    def read(name: str, default: int) -> int:
        value = os.environ.get(name)
        if value is None:
            return default
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"environment variable {name}={value!r} is not an integer") from None

    return read("RANK", 0), read("WORLD_SIZE", 1), read("LOCAL_RANK", 0)


def device_for(strategy: str, local_rank: int) -> torch.device:
    """The device a rank trains on: its local GPU under a launcher when CUDA is there, else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    if strategy == "none":
        return torch.device("cuda")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def start(config: TrainConfig, device: torch.device) -> DistributedRun:
    """Join the launcher's process group for `train.distributed` (or stay single-process for none)."""
    strategy = config.train.distributed
    rank, world_size, local_rank = launched_world()
    if strategy == "none":
        if world_size > 1:
            raise ConfigError(f"launched with WORLD_SIZE={world_size} but 'train.distributed' is none; "
                              "set train.distributed to ddp or fsdp")
        return DistributedRun()
    if strategy == "fsdp" and config.train.optimizer != "adamw":
        raise ConfigError(f"'train.optimizer' {config.train.optimizer} is not supported with train.distributed fsdp "
                          "(its states would not be sharded); use adamw")
    timeout_s = config.train.distributed_timeout_s
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in os.environ:
            if world_size > 1:
                raise ConfigError("WORLD_SIZE > 1 but MASTER_PORT is unset; launch with torchrun (or srun / "
                                  "accelerate launch, which set it)")
            os.environ["MASTER_PORT"] = str(_free_port())
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout_s))
    peers: list = [None] * world_size
    dist.all_gather_object(peers, (socket.gethostname(), os.getpid()))
    return DistributedRun(strategy, rank, world_size, local_rank, timeout_s, tuple(tuple(p) for p in peers),
                          str(device))


def stop(run: DistributedRun) -> None:
    """Leave the process group (after a clean run; a failed collective leaves it to the process exit)."""
    if run.enabled and dist.is_initialized():
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def is_collective_failure(exc: BaseException) -> bool:
    """Whether `exc` is how a collective reports a dead, unreachable or timed-out peer."""
    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    return isinstance(exc, RuntimeError) and bool(_COLLECTIVE_ERROR.search(str(exc)))


def rank_failure(run: DistributedRun, exc: BaseException, last_checkpoint) -> RankFailure:
    """The one-line error for a collective that failed on this rank, naming the ranks known to be gone."""
    gone = _gone_ranks(run)
    who = (f"rank {gone[0]} exited" if len(gone) == 1 else f"ranks {', '.join(map(str, gone))} exited") if gone \
        else f"another rank died or did not answer within train.distributed_timeout_s ({run.timeout_s:g} s)"
    kept = f"resume from {last_checkpoint} with --resume" if last_checkpoint else "no checkpoint was saved"
    detail = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
    return RankFailure(f"rank {run.rank}: {who}; stopping ({kept}) [{detail}]")


def _gone_ranks(run: DistributedRun, patience_s: float = 3.0) -> list[int]:
    """Ranks on this host whose process has exited, waiting up to `patience_s` for one to show.

    A killed peer's sockets close while its process is still exiting, so the collective can fail
    a moment before the process reads as gone (or a zombie)."""
    host = socket.gethostname()
    local = [(rank, pid) for rank, (peer_host, pid) in enumerate(run.peers) if peer_host == host and rank != run.rank]
    deadline = time.monotonic() + patience_s
    while True:
        gone = [rank for rank, pid in local if not _alive(pid)]
        if gone or not local or time.monotonic() >= deadline:
            return gone
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a killed child of torchrun stays a zombie until the agent reaps it
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return True


def check_same_everywhere(run: DistributedRun, fingerprints: dict[str, str]) -> None:
    """Refuse to start when any rank's config, data or model fingerprint differs from rank 0's."""
    if not run.enabled:
        return
    gathered: list = [None] * run.world_size
    dist.all_gather_object(gathered, fingerprints)
    for rank, theirs in enumerate(gathered):
        for what in fingerprints:
            if theirs.get(what) != gathered[0].get(what):
                raise ConfigError(f"rank {rank} has a different {what} than rank 0 ({theirs.get(what)} vs "
                                  f"{gathered[0].get(what)}); every rank must run the same config, data and model")


def config_fingerprint(config: TrainConfig) -> str:
    """A digest of the whole validated config."""
    return _digest(json.dumps(config.model_dump(mode="json"), sort_keys=True).encode())


def data_fingerprint(examples: list) -> str:
    """A digest of the tokenized training examples (ids and labels, in order)."""
    hasher = hashlib.sha256()
    for example in examples:
        hasher.update(torch.tensor(example.input_ids, dtype=torch.int64).numpy().tobytes())
        hasher.update(torch.tensor(example.labels, dtype=torch.int64).numpy().tobytes())
    return hasher.hexdigest()[:16]


def model_fingerprint(model: nn.Module) -> str:
    """A digest of every tensor's name, shape and dtype, plus a CRC of the absmax and trainable tensors.

    The absmax bytes are 1/32 of the 4-bit codes and differ whenever the weights do, so this is
    cheap even for a 70B base and still tells two checkpoints or two quantizations apart.
    """
    hasher = hashlib.sha256()
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        hasher.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        if name.endswith("absmax") or tensor.requires_grad:
            data = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
            hasher.update(zlib.crc32(data).to_bytes(4, "little"))
    return hasher.hexdigest()[:16]


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def rank_rows(indices: list[int], run: DistributedRun, micro_batch_size: int) -> tuple[list[int], int]:
    """This rank's rows of a global micro-batch and how many trailing rows are masked fill.

    `indices` are the example indices of the global micro-batch (micro_batch_size x world_size rows,
    fewer at the end of an epoch). A rank left short is filled with copies of the first row.
    """
    mine = indices[run.rank * micro_batch_size:(run.rank + 1) * micro_batch_size]
    fill = micro_batch_size - len(mine) if run.enabled else 0
    return mine + [indices[0]] * fill, fill


def all_reduce_sum(run: DistributedRun, value: torch.Tensor) -> torch.Tensor:
    """`value` summed over the ranks (in place; returned for chaining); unchanged without a process group."""
    if run.enabled and run.world_size > 1:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def any_rank(run: DistributedRun, *flags: bool) -> tuple[bool, ...]:
    """Each flag true on any rank, so every rank takes the same branch (stop, time cap)."""
    if not run.enabled or run.world_size == 1:
        return tuple(bool(flag) for flag in flags)
    votes = torch.tensor([float(bool(flag)) for flag in flags], dtype=torch.float64, device=run.device)
    dist.all_reduce(votes, op=dist.ReduceOp.SUM)
    return tuple(bool(v > 0) for v in votes.tolist())


def gather_ints(run: DistributedRun, value: int) -> list[int]:
    """`value` from every rank, in rank order ([value] without a process group)."""
    if not run.enabled or run.world_size == 1:
        return [int(value)]
    mine = torch.tensor([int(value)], dtype=torch.int64, device=run.device)
    everyone = [torch.zeros_like(mine) for _ in range(run.world_size)]
    dist.all_gather(everyone, mine)
    return [int(t.item()) for t in everyone]


def barrier(run: DistributedRun) -> None:
    """Wait for every rank (rank 0 finishing a file the others will read)."""
    if run.enabled and run.world_size > 1:
        dist.barrier()


def sum_gradients(run: DistributedRun, params: list[nn.Parameter]) -> None:
    """Sum the gradients of `params` over the ranks (ddp), a flat bucket of up to BUCKET_BYTES at a time."""
    if run.strategy != "ddp" or run.world_size == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    bucket: list[torch.Tensor] = []
    size = 0
    for grad in grads:
        bucket.append(grad)
        size += grad.numel() * grad.element_size()
        if size >= BUCKET_BYTES:
            _reduce_bucket(bucket)
            bucket, size = [], 0
    if bucket:
        _reduce_bucket(bucket)


def _reduce_bucket(grads: list[torch.Tensor]) -> None:
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for grad in grads:
        by_dtype.setdefault(grad.dtype, []).append(grad)
    for same in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in same])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for grad in same:
            grad.copy_(flat[offset:offset + grad.numel()].view_as(grad))
            offset += grad.numel()


def broadcast_trainable(run: DistributedRun, params: list[nn.Parameter]) -> None:
    """Make every rank's trainable parameters rank 0's (ddp: guards against any per-rank init drift)."""
    if run.strategy != "ddp" or run.world_size == 1:
        return
    with torch.no_grad():
        for param in params:
            dist.broadcast(param.data, src=0)


def reseed_dropout(run: DistributedRun, seed: int, step: int) -> None:
    """Seed the global generator (dropout) from (seed, rank, step); a no-op for single-process runs."""
    if run.enabled:
        torch.manual_seed((seed * 1_000_003 + run.rank * 7_919 + step) % 2**63)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks: modules of its `_no_split_modules` classes, else the longest ModuleList."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if layers:
        return layers
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


def storage_as_parameters(layer: nn.Module) -> int:
    """Re-register the 4-bit buffers of every LinearNF4 under `layer` as frozen parameters; returns how many.

    FSDP2 shards parameters, not buffers; the layer reads them by attribute, so it works unchanged.
    """
    from ..modules.linear_nf4 import LinearNF4

    moved = 0
    for module in layer.modules():
        if not isinstance(module, LinearNF4):
            continue
        for name in _STORAGE_NAMES:
            tensor = module._buffers.pop(name, None)
            if tensor is not None:
                module.register_parameter(name, nn.Parameter(tensor, requires_grad=False))
                moved += 1
    return moved


def shard_model(run: DistributedRun, model: nn.Module, device: torch.device) -> int:
    """fsdp: `fully_shard` each decoder layer, its 4-bit storage included; returns the number of layers."""
    if run.strategy != "fsdp":
        return 0
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    layers = decoder_layers(model)
    if not layers:
        raise ConfigError(f"train.distributed fsdp: found no decoder layers in {type(model).__name__} to shard")
    mesh = init_device_mesh(device.type, (run.world_size,))
    for layer in layers:
        storage_as_parameters(layer)
        fully_shard(layer, mesh=mesh, reshard_after_forward=True)
    # One root over the layers, so each is resharded after its forward; the root is the decoder the
    # fused loss calls (the whole model otherwise), and its own parameters (embeddings, final norm,
    # possibly tied to the head) are left replicated.
    prefix = getattr(model, "base_model_prefix", "")
    root = getattr(model, prefix, None) if prefix else None
    root = root if isinstance(root, nn.Module) and any(layer is m for m in root.modules() for layer in layers[:1]) \
        else model
    sharded = {id(p) for layer in layers for p in layer.parameters()}
    fully_shard(root, mesh=mesh, ignored_params={p for p in root.parameters() if id(p) not in sharded})
    return len(layers)


def backward_scale(run: DistributedRun) -> int:
    """The factor on each rank's loss before backward that makes the synced gradient a sum over ranks.

    FSDP2's reduce-scatter averages over the ranks (a sum-only divide factor needs PREMUL_SUM, which
    gloo lacks), so under fsdp the loss is scaled by the world size; the ddp buckets sum directly.
    """
    return run.world_size if run.strategy == "fsdp" else 1


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """A sharded DTensor gathered whole (a collective: every rank calls it in the same order); others as is."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def shard_like(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """`full` laid out as `param` is: this rank's shard when `param` is a DTensor, else `full` itself."""
    if not hasattr(param, "device_mesh"):
        return full
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.to(param.device, param.dtype), param.device_mesh, param.placements)


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """optimizer.state_dict() with sharded state tensors gathered whole (a collective under fsdp)."""
    state_dict = optimizer.state_dict()  # its per-parameter dicts are the optimizer's own: build new ones
    state_dict["state"] = {index: {key: full_tensor(slots[key]) for key in sorted(slots)}
                           for index, slots in sorted(state_dict["state"].items())}
    return state_dict


def shard_optimizer_state(state_dict: dict, params: list[nn.Parameter]) -> dict:
    """A full optimizer state_dict with each state tensor of a parameter's shape laid out like that parameter."""
    for index, slots in state_dict["state"].items():
        param = params[int(index)]
        for key, value in slots.items():
            if torch.is_tensor(value) and tuple(value.shape) == tuple(param.shape) and value.dim() > 0:
                slots[key] = shard_like(value, param)
    return state_dict


def gathered_grad_norm(norm: torch.Tensor) -> float:
    """The total gradient norm from clip_grad_norm_, whole (a DTensor under fsdp)."""
    return float(full_tensor(norm))
