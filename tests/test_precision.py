"""Precision names as the command line gives them, and the autocast they stand for."""

from __future__ import annotations

import pytest
import torch

from cvt.precision import active_autocast_dtype, autocast, autocast_dtype


@pytest.mark.parametrize(
    ("name", "dtype"), [("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", None), ("none", None)]
)
def test_each_name_autocasts_to_its_dtype_or_not_at_all(name: str, dtype: torch.dtype | None) -> None:
    assert autocast_dtype(name) is dtype
    with autocast("cpu", name):
        assert active_autocast_dtype("cpu") is dtype
        assert torch.is_autocast_enabled("cpu") == (dtype is not None)
    assert active_autocast_dtype("cpu") is None  # and it ends with the block


def test_devices_without_autocast_answer_none() -> None:
    assert active_autocast_dtype("meta") is None
