"""Numeric precision by name, as the command-line options give it: the dtypes and their autocast.

``cvt bench --dtype`` names ``fp32``, ``bf16`` or ``fp16``; ``--amp`` of ``cvt train`` and ``cvt eval``
names ``none`` (full precision), ``bf16`` or ``fp16``.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
FULL_PRECISION: tuple[str, ...] = ("fp32", "none")


def autocast_dtype(name: str) -> torch.dtype | None:
    """The dtype ``torch.autocast`` computes in for ``name`` (``bf16``, ``fp16``), None for full precision."""
    return None if name in FULL_PRECISION else DTYPES[name]


def autocast(device_type: str, name: str) -> AbstractContextManager[Any]:
    """``torch.autocast`` on ``device_type`` (``cpu``, ``cuda``) in ``name``'s dtype; a no-op for full
    precision."""
    dtype = autocast_dtype(name)
    return nullcontext() if dtype is None else torch.autocast(device_type, dtype=dtype)


def autocast_casts(t: torch.Tensor) -> bool:
    """Whether autocast casts ``t`` to its dtype for the ops it runs in lower precision: floating
    tensors other than float64 (which autocast leaves alone)."""
    return t.is_floating_point() and t.dtype != torch.float64


def active_autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast casts to on ``device_type`` (``cpu``, ``cuda``) now; None when it is off there.

    Devices without autocast (``meta``) answer None. Under ``torch.compile`` the availability query is
    skipped: the Dynamo of torch 2.11 cannot trace it (2.14's can) and broke the graph in every block, and
    compiled models run on devices that have autocast.
    """
    available = torch.compiler.is_compiling() or torch.amp.is_autocast_available(device_type)
    if available and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None
