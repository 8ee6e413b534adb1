"""Per-sample augmentation seeds: the random transform of an image depends on (seed, epoch, index) only.

With ``num_workers > 0`` torch seeds each worker once per epoch and hands it every ``num_workers``-th
batch, so an augmentation would depend on which worker loaded the image and on how many images that
worker had loaded before: a run resumed in the middle of an epoch (``--save-every-steps``) would draw
other crops. Seeding the generators per sample makes the stream independent of workers and of resumes.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

_MASK64 = (1 << 64) - 1


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 32-bit seed mixed from the three numbers (SplitMix64's finaliser: neighbours get unrelated seeds)."""
    x = (seed * 0x9E3779B97F4A7C15 + epoch * 0xC2B2AE3D27D4EB4F + index * 0x165667B19E3779F9) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (x ^ (x >> 31)) & 0xFFFFFFFF


def seed_generators(seed: int, cuda: bool = False) -> None:
    """Seed the global generators: torch's CPU one (with ``cuda`` every GPU's too), ``random`` and numpy
    (``seed`` mod 2**32, its range). A transform draws from the CPU ones only: a data-loading process
    leaves the GPUs' generators alone."""
    if cuda:
        torch.manual_seed(seed)
    else:
        torch.default_generator.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


@contextmanager
def callers_generators_kept() -> Iterator[None]:
    """Puts the global torch (CPU), ``random`` and numpy generators back on exit, so that loading in the
    training process (``num_workers=0``) does not move its dropout and mixup streams. A worker process's
    generators are its own: nothing to keep (saving numpy's state costs ~0.1 ms)."""
    if get_worker_info() is not None:
        yield
        return
    torch_state, python_state, numpy_state = torch.get_rng_state(), random.getstate(), np.random.get_state()
    try:
        yield
    finally:
        torch.set_rng_state(torch_state)
        random.setstate(python_state)
        np.random.set_state(numpy_state)


class PerSampleSeeds(Dataset):
    """``dataset`` whose item ``i`` is loaded with the generators seeded from ``(seed, epoch, i)``.

    Call :meth:`set_epoch` before each epoch's DataLoader is created (its workers copy the dataset then).
    The DataLoader fetches a batch through :meth:`__getitems__`, which keeps the caller's generators
    once per batch rather than once per image.
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """The epoch whose augmentations the next items draw."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[Any]:
        items = []
        with callers_generators_kept():
            for index in indices:
                seed_generators(sample_seed(self.seed, self.epoch, index))
                items.append(self.dataset[index])
        return items
