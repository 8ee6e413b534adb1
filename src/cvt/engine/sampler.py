"""The training sampler: a per-epoch shuffle that a resumed run can re-enter mid-epoch.

The order of epoch ``e`` is a permutation drawn from a generator seeded with ``(seed, e)`` only, so
it is the same after a restart; ``start`` skips the samples that were already used. With ``R``
processes, rank ``r`` takes every R-th index of the permutation (as ``DistributedSampler``), so the
R per-rank batches of a step together hold exactly the samples of the single-process batch of the
same global size.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class ResumableSampler(Sampler[int]):
    """Shuffled, rank-sharded, epoch-seeded indices with a resume offset.

    Args:
        num_samples: data-set length.
        batch_size: per-rank batch size; the epoch is cut to whole global batches (drop last).
        rank, world_size: this process and the number of processes.
        seed: base seed of the shuffle.
        accum_steps: the epoch is also cut to a whole number of accumulation windows.
    """

    def __init__(
        self, num_samples: int, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
        accum_steps: int = 1,
    ) -> None:  # fmt: skip
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.accum_steps = accum_steps
        self.epoch = 0
        self.start = 0  # samples of this rank already consumed in the epoch

    @property
    def batches_per_epoch(self) -> int:
        """Optimizer micro-batches per epoch (the same on every rank)."""
        batches = self.num_samples // (self.batch_size * self.world_size)
        return batches - batches % self.accum_steps

    def set_position(self, epoch: int, batches_done: int = 0) -> None:
        """Start ``epoch`` after its first ``batches_done`` batches."""
        self.epoch = epoch
        self.start = batches_done * self.batch_size

    def __len__(self) -> int:
        return self.batches_per_epoch * self.batch_size - self.start

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.num_samples, generator=g)
        used = order[: self.batches_per_epoch * self.batch_size * self.world_size]
        mine = used[self.rank :: self.world_size]  # (batches_per_epoch * batch_size,)
        return iter(mine[self.start :].tolist())
