"""Suite-wide settings."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import pytest
import torch

# Subprocesses of the tests (cvt train children that are killed and resumed) must run with the same
# single thread as the tests themselves: bit-exact comparisons depend on the reduction order.
os.environ["OMP_NUM_THREADS"] = "1"


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    """One intra-op thread per test: the tensors are small, and `pytest -n 2` already fills both
    cores (two workers with two spinning threads each run about ten times slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def fake_result() -> Callable[[str, list[float]], object]:
    """Builds a :class:`cvt.benchmark.BenchResult` of one subject from its runs' img/s alone (median, min
    and max taken from them), for the arithmetic that compares subjects."""
    from cvt.benchmark import BenchResult

    def make(subject: str, runs: list[float]) -> BenchResult:
        median = sorted(runs)[len(runs) // 2]
        return BenchResult(subject, median, min(runs), max(runs), runs, 0.0, 1.0, None, 1.0, None, None)

    return make


@pytest.fixture
def reduced_decode(monkeypatch: pytest.MonkeyPatch) -> None:
    """``load_image`` with a ``min_side`` reduces images of any size (normally only those over 4096²
    pixels), so that tests check the reduced decode on small files."""
    monkeypatch.setattr("cvt.data.images._FULL_DECODE_MAX_PIXELS", 0)


# dims of a CvT of a few thousand parameters, for variants that would otherwise be full size
MICRO_MODEL_ARGS = {"embed_dim": [8, 16, 32], "depth": [1, 1, 1], "num_heads": [1, 1, 2]}


@pytest.fixture
def micro_cvt13() -> torch.nn.Module:
    """cvt_13 (published preprocessing: a 0.875 center crop) shrunk to a few thousand parameters, for
    10 classes at 32x32."""
    from cvt import create_model

    torch.manual_seed(0)
    return create_model("cvt_13", num_classes=10, img_size=32, **MICRO_MODEL_ARGS).eval()
