"""The machine a measurement ran on and what it can do: the facts reported with every figure
(:func:`machine_info`, :func:`describe_machine`), the CPUs this process may use, whether bf16 has
compiled kernels, and the matrix-product ceiling the achieved GFLOP/s are a fraction of."""

from __future__ import annotations

import os
import sys
from typing import Any

import torch

from cvt.benchmark.timing import repeats_per_run, timed_run
from cvt.precision import DTYPES


def has_bf16_kernels(device: str) -> bool:
    """Whether bf16 runs on compiled kernels (not emulated in reference code) on ``device``."""
    if device.startswith("cuda"):
        return torch.cuda.is_bf16_supported()
    from cvt.models import cpu_kernels

    return cpu_kernels.CPU_HAS_BF16_KERNELS  # read at call time: op_census and tests override it


def logical_cpus() -> int:
    """The logical CPUs this process may run on (taskset, cgroups) where the OS says, else all of them."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def machine_info(device: str, subjects: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """What a measurement on ``device`` depends on, to be reported with it: the CPU's model name, the
    logical CPUs this process may use and torch's threads, the Python and torch versions, torch's CPU
    capability (the vector instructions ATen's kernels use), whether bf16 has compiled kernels there,
    the GPU's name on CUDA, and the version of transformers where ``subjects`` include ``hf`` (its port
    is the comparison)."""
    import platform
    from importlib import metadata

    from cvt.models import cpu_kernels

    info: dict[str, Any] = {
        "cpu": cpu_kernels.cpuinfo_field("model name") or platform.processor() or platform.machine(),
        "logical_cpus": logical_cpus(),
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "bf16_kernels": has_bf16_kernels(device),
    }
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(device)
    if "hf" in subjects:
        try:
            info["transformers"] = metadata.version("transformers")
        except metadata.PackageNotFoundError:  # importable without package metadata (a source tree)
            info["transformers"] = getattr(sys.modules.get("transformers"), "__version__", "unknown")
    return info


def describe_machine(info: dict[str, Any]) -> str:
    """:func:`machine_info` on one line: ``AMD EPYC (2 logical CPUs, torch threads 2), Python 3.11.7, …``."""
    words = [
        f"{info['cpu']} ({info['logical_cpus']} logical CPUs, torch threads {info['threads']})",
        f"Python {info['python']}",
        f"torch {info['torch']}",
        f"CPU capability {info['cpu_capability']}",
        f"bf16 kernels {'yes' if info['bf16_kernels'] else 'no'}",
    ]
    if "gpu" in info:
        words.insert(1, info["gpu"])
    if "transformers" in info:
        words.append(f"transformers {info['transformers']}")
    return ", ".join(words)


def ceiling_skip_reason(dtype: str, device: str) -> str | None:
    """Why :func:`matmul_ceiling` is not worth measuring for ``dtype`` on ``device``, or None."""
    if dtype == "bf16" and not has_bf16_kernels(device):
        return f"bf16 matrix products are emulated on {device} (no bf16 kernels): they would take minutes"
    return None


def matmul_ceiling(dtype: str, device: str, sizes: tuple[int, ...] = (1024, 2048), runs: int = 5) -> float:
    """GFLOP/s of the fastest square matrix product in ``dtype``: for each of ``sizes``, the fastest of
    ``runs`` timed runs (each of as many products as :func:`repeats_per_run` asks, after one untimed
    product), the best size's rate. An upper bound for the model's products: a median of one size
    fell below what the model itself reached on a noisy 2-core VM (fp32 "of ceiling" 103-127 %)."""
    rates = []
    for size in sizes:
        a = torch.randn(size, size, device=device, dtype=DTYPES[dtype])
        b = torch.randn(size, size, device=device, dtype=DTYPES[dtype])

        def product(a: torch.Tensor = a, b: torch.Tensor = b) -> None:
            a @ b

        product()  # warm-up: library initialisation and kernel selection
        repeats = repeats_per_run(product, device)
        fastest = min(timed_run(product, repeats, device) for _ in range(runs))
        rates.append(2 * size**3 / fastest / 1e9)
    return max(rates)
