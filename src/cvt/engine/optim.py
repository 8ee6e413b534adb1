"""Optimizer and per-step learning-rate schedule of a training run.

Weight decay applies to weight matrices and convolution kernels only: biases, every norm's scale
and shift (1-D parameters) and ``model.no_weight_decay()`` (cls tokens, position embeddings) get
none, as in the official recipe's ``WITHOUT_WD_LIST: ['bn', 'bias', 'ln']``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from cvt.engine.config import TrainConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two groups: decayed weights, and biases/norms/tokens with ``weight_decay`` 0."""
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        # 1-D: biases, LayerNorm/BatchNorm weights and biases
        (no_decay if param.ndim <= 1 or name in skip else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def effective_lr(cfg: TrainConfig, global_batch: int) -> float:
    """``lr``, scaled linearly by ``global_batch / lr_base_batch`` when ``lr_base_batch`` is set.

    The official CvT code multiplies its per-GPU ``TRAIN.LR`` by the number of processes
    (``TRAIN.SCALE_LR``), i.e. scales it linearly with the global batch; ``lr_base_batch`` is that
    per-GPU batch in the paper recipes. ``global_batch`` counts processes and accumulation steps.
    """
    return cfg.lr * global_batch / cfg.lr_base_batch if cfg.lr_base_batch else cfg.lr


def build_optimizer(model: nn.Module, cfg: TrainConfig, lr: float) -> torch.optim.Optimizer:
    """AdamW or SGD (momentum, optional Nesterov) over :func:`param_groups`."""
    groups = param_groups(model, cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    return torch.optim.AdamW(groups, lr=lr)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int) -> Any:
    """timm's scheduler stepped per optimizer step: ``scheduler.step_update(step)`` sets the lr.

    Linear warm-up from ``warmup_lr`` over ``warmup_epochs``, then cosine to ``min_lr``, a decay by
    ``decay_rate`` every ``decay_epochs`` (step) or at ``decay_milestones`` (multistep), or constant.
    The lr is a function of the step count only, so a resumed run sets it from the step it restores.
    As in timm (and the official recipes trained with it), the cosine is counted from step 0, not
    from the warm-up's end, so the first step after the warm-up runs below ``lr`` (0.85 of it after 1
    warm-up epoch of 4, 0.999 after 5 of 300); ``multistep`` decays on the last step of a milestone
    epoch, ``step`` on the first step after it.
    """
    from timm.scheduler import create_scheduler_v2

    if cfg.sched == "constant":
        # a step schedule whose first decay never comes, with the same warm-up
        sched, decay_epochs = "step", cfg.epochs + 1
    else:
        sched, decay_epochs = cfg.sched, cfg.decay_epochs
    scheduler, _ = create_scheduler_v2(
        optimizer, sched=sched, num_epochs=cfg.epochs, decay_epochs=decay_epochs,
        decay_milestones=list(cfg.decay_milestones), decay_rate=cfg.decay_rate, min_lr=cfg.min_lr,
        warmup_lr=cfg.warmup_lr, warmup_epochs=cfg.warmup_epochs, step_on_epochs=False,
        updates_per_epoch=steps_per_epoch,
    )  # fmt: skip
    scheduler.step_update(0)  # the lr of step 0 (warm-up start), before the first update
    return scheduler
