"""Per-sample augmentation seeds (cvt.data.seeding): an item's random draws depend on (seed, epoch, index)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from cvt.data.seeding import PerSampleSeeds, sample_seed, seed_generators


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


def test_sample_seed_is_splitmix64s_output_cut_to_32_bits() -> None:
    # SplitMix64 from state 0 outputs 0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F (the
    # reference implementation's first three); seed k is its k-th output, cut to 32 bits
    assert [sample_seed(k, 0, 0) for k in (1, 2, 3)] == [0x7B1DCDAF, 0xA1B965F4, 0x8009454F]


def test_item_i_draws_from_the_generators_seeded_by_sample_seed_of_seed_epoch_and_i() -> None:
    data = PerSampleSeeds(RandomDraws(), seed=3)
    data.set_epoch(2)
    for i in (0, 5):
        seed_generators(sample_seed(3, 2, i))
        torch.testing.assert_close(data[i], RandomDraws()[i], rtol=0, atol=0)
    # a run of seed 1 must not replay, at epoch 0, the augmentations of a run of seed 0 at epoch 1
    assert sample_seed(0, 1, 5) != sample_seed(1, 0, 5)


@pytest.mark.parametrize("seed", [5, 2**31 + 5, 2**32 + 5, 2**40 + 5])
def test_each_generator_takes_the_whole_seed_numpy_modulo_its_range(seed: int) -> None:
    # per-sample seeds reach 2**32 - 1 and cvt train's per-rank ones grow with the step
    seed_generators(seed)
    drawn = (torch.rand(()).item(), random.random(), np.random.rand())
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    assert drawn == (torch.rand(()).item(), random.random(), np.random.rand())


def test_epoch_and_index_enter_the_seed_with_their_own_constants():
    """Pinned: a run resumed from a checkpoint of an earlier version draws the same augmentations."""
    assert [sample_seed(0, 1, 0), sample_seed(0, 0, 1), sample_seed(7, 3, 11)] == [
        0x4E2E5A26, 0x946013E3, 0xA36A9DEE
    ]  # fmt: skip
