"""What to change when a run does not fit: each change re-estimated, cheapest first.

Order of cost (to throughput or to the result): a smaller micro-batch with more accumulation (same
optimizer step, slower), a shorter seq_len (changes what is trained), gradient checkpointing (one
more forward per step), an 8-bit or paged optimizer, a lower LoRA rank, more ranks under FSDP. Each
suggestion is one change to the original config, at the smallest step that fits (or the furthest
one tried), and is listed only when it lowers the predicted peak (by 1% at least).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class Suggestion:
    """One change to the config and the peak it predicts."""

    description: str
    changes: dict[str, object]
    """Dotted config keys (as `--set` takes them) and their new values; `world_size` for more ranks."""
    peak_bytes: int

_FSDP_RANKS = (2, 4, 8, 16, 32, 64)
MIN_GAIN = 0.01
"""A change is suggested only when it lowers the peak by at least this fraction."""


def _with(config, changes: dict):
    """`config` with dotted keys set (a validated copy)."""
    from .config import apply_overrides, config_from_dict

    raw = config.model_dump(mode="json")
    return config_from_dict(apply_overrides(raw, [f"{key}={value}" for key, value in changes.items()]))


def _candidates(config, world_size: int) -> list[tuple[str, list[tuple[dict, int]]]]:
    """(description template, [(changes, world size), ...] from the mildest to the strongest) per kind of change."""
    train, lora = config.train, config.lora
    kinds = []
    batches = []
    size, accum = train.micro_batch_size, train.grad_accum
    while size > 1:
        size, accum = size // 2, accum * 2
        batches.append(({"train.micro_batch_size": size, "train.grad_accum": accum}, world_size))
    kinds.append(("micro-batch {train.micro_batch_size} with grad_accum {train.grad_accum} (same batch per step)",
                  batches))
    lengths, length = [], train.seq_len
    while length > 256:
        length //= 2
        lengths.append(({"train.seq_len": length}, world_size))
    kinds.append(("seq_len {train.seq_len}", lengths))
    if not train.gradient_checkpointing:
        kinds.append(("gradient checkpointing on", [({"train.gradient_checkpointing": True}, world_size)]))
    optimizers = [name for name in ("adamw8bit", "paged_adamw") if name != train.optimizer]
    if train.optimizer != "paged_adamw":
        kinds.append(("optimizer {train.optimizer}", [({"train.optimizer": name}, world_size) for name in optimizers]))
    ranks, rank = [], lora.r
    while rank > 4 and config.method != "full":
        rank //= 2
        ranks.append(({"lora.r": rank, "lora.alpha": lora.alpha * rank / lora.r}, world_size))
    kinds.append(("LoRA rank {lora.r} (alpha scaled to keep alpha/r)", ranks))
    current = world_size if train.distributed == "fsdp" else 1
    kinds.append(("FSDP over {world_size} ranks", [({"train.distributed": "fsdp"}, n) for n in _FSDP_RANKS
                                                   if n > current]))
    return kinds


def suggestions(config, peak_bytes: int, world_size: int, estimate: Callable) -> list[Suggestion]:
    """The changes that lower `peak_bytes`, in order of cost, each with its own predicted peak;
    `estimate(config, world_size)` is the plan (without suggestions) of a changed config."""
    found = []
    for template, steps in _candidates(config, world_size):
        best = None
        for changes, ranks in steps:
            changed = _with(config, changes)
            new = estimate(changed, ranks)
            if new.peak_bytes > peak_bytes * (1 - MIN_GAIN) or (best is not None and new.peak_bytes >= best.peak_bytes):
                continue
            shown = {**changes, "world_size": ranks} if "train.distributed" in changes else changes
            values = {"train": changed.train, "lora": changed.lora, "world_size": ranks}
            best = Suggestion(template.format(**values), shown, new.peak_bytes)
            if new.fits:
                break
        if best is not None:
            found.append(best)
    return found
