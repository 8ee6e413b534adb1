"""Per-sample augmentation seeds (cvt.data.seeding): an item's random draws depend on (seed, epoch, index)."""

from __future__ import annotations

import random

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from cvt.data.seeding import PerSampleSeeds, seed_generators


class RandomDraws(Dataset):
    """Item i: one draw from each global generator a transform may use (torch, random, numpy)."""

    def __len__(self) -> int:
        return 12

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.tensor([torch.rand(()).item(), random.random(), np.random.rand()], dtype=torch.float64)


def items(dataset: Dataset, order: list[int]) -> dict[int, torch.Tensor]:
    return {i: dataset[i] for i in order}


def test_an_item_draws_the_same_whatever_came_before_and_the_callers_streams_do_not_move() -> None:
    data = PerSampleSeeds(RandomDraws(), seed=7)
    seed_generators(0)
    forward = items(data, list(range(12)))
    after = (torch.rand(()).item(), random.random(), np.random.rand())
    backward = items(data, list(range(11, -1, -1)))
    for i in range(12):
        torch.testing.assert_close(forward[i], backward[i], rtol=0, atol=0)
    seed_generators(0)
    assert (torch.rand(()).item(), random.random(), np.random.rand()) == after  # untouched by the items
    assert len({tuple(v.tolist()) for v in forward.values()}) == 12  # distinct per index


def test_another_epoch_or_seed_draws_otherwise_and_workers_draw_the_same() -> None:
    data = PerSampleSeeds(RandomDraws(), seed=7)
    first = torch.stack([data[i] for i in range(12)])
    data.set_epoch(1)
    second = torch.stack([data[i] for i in range(12)])
    assert not torch.isclose(first, second).any()
    in_workers = torch.cat(list(DataLoader(data, batch_size=5, num_workers=2)))
    torch.testing.assert_close(in_workers, second, rtol=0, atol=0)
    other_seed = PerSampleSeeds(RandomDraws(), seed=8)
    assert not torch.isclose(torch.stack([other_seed[i] for i in range(12)]), first).any()
