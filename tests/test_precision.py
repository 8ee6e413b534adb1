"""Precision names as the command line gives them, and the autocast they stand for."""

from __future__ import annotations

import warnings

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


def test_autocast_turns_on_the_device_named_and_no_other() -> None:
    """``autocast("cuda", ...)`` leaves the CPU at full precision (it is off on a machine without CUDA)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch: "CUDA is not available ... Disabling autocast"
        with autocast("cuda", "bf16"):
            assert not torch.is_autocast_enabled("cpu") and active_autocast_dtype("cpu") is None
            on_cuda = torch.bfloat16 if torch.cuda.is_available() else None
            assert active_autocast_dtype("cuda") is on_cuda


def test_each_device_answers_its_own_autocast_dtype() -> None:
    """CUDA autocast in fp16 while the CPU's is in bf16: each device answers its own dtype."""
    enabled, dtype = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
    try:
        torch.set_autocast_enabled("cuda", True)  # the state only: no GPU needed
        torch.set_autocast_dtype("cuda", torch.float16)
        with autocast("cpu", "bf16"):
            assert active_autocast_dtype("cuda") is torch.float16
            assert active_autocast_dtype("cpu") is torch.bfloat16
    finally:
        torch.set_autocast_enabled("cuda", enabled)
        torch.set_autocast_dtype("cuda", dtype)
