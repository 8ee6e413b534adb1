"""The training engine: the training loop, its state and checkpoints, and evaluation."""
