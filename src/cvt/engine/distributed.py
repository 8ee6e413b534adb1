"""Process-group set-up for ``torchrun``: one process per device, rank 0 writes every file.

``torchrun --nproc_per_node N -m cvt train ...`` sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``;
without them training runs in one process. NCCL is used on GPUs, gloo on CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from cvt.devices import resolve_device


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits: its rank among ``world_size`` processes and its device."""

    rank: int
    world_size: int
    device: torch.device
    owns_group: bool = False  # init_distributed created the process group (and shutdown ends it)
    # the tensors this process's collectives reduce in, by (length, dtype); see _all_reduce
    collective_buffers: dict[tuple[int, torch.dtype], torch.Tensor] = field(
        default_factory=dict, compare=False, repr=False
    )

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that prints, logs and writes checkpoints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Whether there is a process group (more than one process)."""
        return self.world_size > 1


def init_distributed(device_name: str) -> DistEnv:
    """Join the ``torchrun`` process group when launched by it; a single-process env otherwise."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
    joins = world_size > 1 and not dist.is_initialized()  # a group the caller made stays the caller's
    if joins:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistEnv(rank, world_size, device, owns_group=joins)


def shutdown_distributed(env: DistEnv) -> None:
    """Leave the process group if :func:`init_distributed` created it; a caller's group stays up."""
    if env.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def _all_reduce(env: DistEnv, values: list[float], dtype: torch.dtype, op: dist.ReduceOp) -> list[float]:
    """``values`` reduced over the ranks with ``op``, in a buffer that ``env`` keeps for the next call.

    The buffer outlives the collective on purpose: a gloo worker thread drops its reference to the
    tensor after ``all_reduce`` has returned, and if that is the last one (a temporary that Python
    already freed) it takes the GIL while holding the group's queue lock. Where the process group's
    destructor keeps the GIL (torch 2.5; pytorch/pytorch#154976 releases it), leaving the group right
    after a collective then deadlocks: about one ``torchrun`` exit in two with torch 2.5.1.
    """
    key = (len(values), dtype)
    buffer = env.collective_buffers.get(key)
    if buffer is None:
        buffer = env.collective_buffers[key] = torch.empty(len(values), dtype=dtype, device=env.device)
    buffer.copy_(torch.tensor(values, dtype=dtype))
    dist.all_reduce(buffer, op=op)
    return buffer.tolist()


def any_rank(env: DistEnv, flag: bool) -> bool:
    """True on every rank when ``flag`` is true on at least one (a collective: all ranks must call it)."""
    if not env.distributed:
        return flag
    return _all_reduce(env, [float(flag)], torch.float32, dist.ReduceOp.MAX)[0] > 0


def mean_over_ranks(env: DistEnv, values: list[float]) -> list[float]:
    """Element-wise mean of ``values`` over the ranks (identity in one process)."""
    if not env.distributed:
        return values
    return [total / env.world_size for total in _all_reduce(env, values, torch.float64, dist.ReduceOp.SUM)]
