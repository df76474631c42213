"""The training stage: config schema, the one training loop, optimizers, checkpoints and metrics."""

from .config import ConfigError, TrainConfig, load_config
from .loop import TrainHooks, TrainingDiverged, TrainingInterrupted, TrainResult, train

__all__ = [
    "ConfigError",
    "TrainConfig",
    "TrainHooks",
    "TrainResult",
    "TrainingDiverged",
    "TrainingInterrupted",
    "load_config",
    "train",
]
