"""The training engine: the training loop, its state and checkpoints, and evaluation."""

from cvt.engine.config import TrainConfig, resolve_config
from cvt.engine.resume import resolve_run
from cvt.engine.trainer import NonFiniteLossError, train

__all__ = ["NonFiniteLossError", "TrainConfig", "resolve_config", "resolve_run", "train"]
