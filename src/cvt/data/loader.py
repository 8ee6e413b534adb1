"""The DataLoader: seeded shuffling, a DistributedSampler under torchrun, clear batch-size errors."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, default_collate

from cvt.errors import UsageError


def collate_readable(batch: list[Any]) -> Any:
    """``default_collate`` of the items that are not None (images an evaluation left out as unreadable,
    see :class:`~cvt.data.datasets.ImageFolderDataset`); a batch left with none gives empty tensors."""
    kept = [item for item in batch if item is not None]
    if not kept:
        return torch.empty(0), torch.empty(0, dtype=torch.long)
    return default_collate(kept)


def build_loader(
    dataset: Dataset,
    batch_size: int,
    train: bool,
    num_workers: int = 0,
    distributed: bool = False,
    seed: int = 0,
    drop_last: bool | None = None,
    collate_fn: Callable | None = None,
) -> DataLoader:
    """A loader that shuffles (``train``) in an order fixed by ``seed``.

    ``drop_last`` defaults to ``train`` (equal-size training batches, as mixup needs). With
    ``distributed``, each process reads its shard through a :class:`DistributedSampler`; call
    ``loader.sampler.set_epoch(epoch)`` every epoch to reshuffle. A training batch larger than the
    (per-process) data set raises :class:`~cvt.errors.UsageError` instead of giving zero batches.
    ``collate_fn``: how items become a batch (default ``default_collate``; :func:`collate_readable`).
    """
    if batch_size < 1:
        raise UsageError(f"batch size must be >= 1, got {batch_size}")
    if num_workers < 0:
        raise UsageError(f"num_workers must be >= 0, got {num_workers}")
    drop_last = train if drop_last is None else drop_last
    sampler = None
    generator = None
    per_process = len(dataset)
    if distributed:
        sampler = DistributedSampler(dataset, shuffle=train, seed=seed)
        per_process = sampler.num_samples
    else:
        generator = torch.Generator().manual_seed(seed)  # same seed → same order, workers seeded from it
    if drop_last and batch_size > per_process:
        where = "per process" if distributed else "in total"
        raise UsageError(
            f"batch size {batch_size} is larger than the data set ({per_process} images {where}): "
            f"no full batch to train on; use --batch-size {per_process} or less"
        )
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=train and sampler is None, sampler=sampler,
        num_workers=num_workers, drop_last=drop_last, generator=generator, collate_fn=collate_fn,
        pin_memory=torch.cuda.is_available(), persistent_workers=num_workers > 0,
    )  # fmt: skip
