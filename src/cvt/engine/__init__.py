"""The training engine: the training loop, its state and checkpoints, and evaluation."""

from cvt.engine.config import TrainConfig, resolve_config
from cvt.engine.trainer import NonFiniteLossError, resolve_run, train

__all__ = ["NonFiniteLossError", "TrainConfig", "resolve_config", "resolve_run", "train"]
