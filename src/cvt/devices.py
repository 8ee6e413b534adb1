"""The one parser of the ``--device`` option (``auto``, ``cpu``, ``cuda``, ``cuda:N``), shared by every
command that runs a model and by ``torchrun`` training (where ``auto`` and ``cuda`` mean the process's
own GPU, ``LOCAL_RANK``).
"""

from __future__ import annotations

import torch

from cvt.errors import UsageError


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` → ``cuda:<local_rank>`` when a GPU is available, else ``cpu``; other names as given."""
    if name == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):  # mps, meta …: torch fails later, deep inside
        raise UsageError(f"option 'device' must be auto, cpu, cuda or cuda:N, got {name!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"device {name!r} asked for, but torch sees no CUDA GPU")
        if device.index is None:
            device = torch.device("cuda", local_rank)
    return device
