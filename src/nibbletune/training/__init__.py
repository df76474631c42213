"""The training stage: config schema, the one training loop, optimizers, checkpoints, metrics and the memory plan."""

from .config import ConfigError, TrainConfig, load_config
from .loop import TrainHooks, TrainingDiverged, TrainingInterrupted, TrainResult, train
from .memory_plan import MemoryPlan, estimate_memory, plan

__all__ = [
    "ConfigError",
    "MemoryPlan",
    "TrainConfig",
    "TrainHooks",
    "TrainResult",
    "TrainingDiverged",
    "TrainingInterrupted",
    "estimate_memory",
    "load_config",
    "plan",
    "train",
]
