"""The DataLoader of training (full batches in a sampler's or a seeded order) and of evaluation (every
item in order), with clear batch-size errors."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

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
    sampler: Sampler[int] | None = None,
    seed: int = 0,
    collate_fn: Callable | None = None,
    pin_memory: bool | None = None,
    worker_init_fn: Callable[[int], None] | None = None,
) -> DataLoader:
    """A training loader (``train``: full batches only) or an evaluation one (every item, in order).

    A training loader reads in ``sampler``'s order (``cvt train``'s
    :class:`~cvt.engine.sampler.ResumableSampler`: shuffled per epoch, sharded over the processes under
    torchrun, resumable mid-epoch) or, without one, in a shuffle fixed by ``seed``; ``seed`` also fixes
    the worker processes' base seeds. Without a sampler, a training batch larger than the data set
    raises :class:`~cvt.errors.UsageError` instead of giving zero batches (a sampler's owner checks its
    own). A training loader is made for one epoch, an evaluation loader may be iterated again (every
    epoch's validation): only the latter keeps its worker processes between passes.
    ``pin_memory``: page-locked batches, for copies to a GPU (default: when torch sees one).
    ``collate_fn``: how items become a batch (default ``default_collate``; :func:`collate_readable`).
    ``worker_init_fn``: called in each worker process with its id, as ``DataLoader``'s.
    """
    if batch_size < 1:
        raise UsageError(f"batch size must be >= 1, got {batch_size}")
    if num_workers < 0:
        raise UsageError(f"num_workers must be >= 0, got {num_workers}")
    size = len(dataset)
    if train and sampler is None and batch_size > size:
        raise UsageError(
            f"batch size {batch_size} is larger than the data set ({size} images): no full batch to "
            f"train on; use --batch-size {size} or less"
        )
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=train and sampler is None, sampler=sampler,
        num_workers=num_workers, drop_last=train, generator=torch.Generator().manual_seed(seed),
        collate_fn=collate_fn, pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        worker_init_fn=worker_init_fn,
        persistent_workers=num_workers > 0 and not train,
    )  # fmt: skip


def close_workers(loader: DataLoader) -> None:
    """End the worker processes an evaluation loader keeps between passes (``persistent_workers``).

    torch ends them only when the loader's iterator is garbage-collected. A loader kept alive past its
    run (a reference cycle, a stored traceback) left them running into interpreter exit, where
    multiprocessing's exit handler terminates and then joins them: ``cvt train``'s workers ignore
    SIGTERM, so the process never exited.
    """
    # DataLoader keeps a persistent-workers iterator in ``_iterator`` (torch >= 1.7; no public API)
    iterator = getattr(loader, "_iterator", None)
    if iterator is not None:
        loader._iterator = None
        iterator._shutdown_workers()
