"""Which aten ops one CvT forward runs: count, input shapes and dtypes, and the line of this package
that called each. No timing: it finds needless casts and copies on any machine.

    .venv/bin/python benchmarks/op_census.py --dtype bf16 --bf16-kernels yes   # bf16 inference as on AVX-512
    .venv/bin/python benchmarks/op_census.py --ops _to_copy,copy_,cat,clone     # the default filter
    .venv/bin/python benchmarks/op_census.py --mode train --ops all

``--bf16-kernels`` overrides what the model detected (``cvt.models.cpu_kernels.CPU_HAS_BF16_KERNELS``), so
the code path of an AVX-512 CPU can be listed on an AVX2 one (its bf16 kernels are emulated there:
slow, but the same ops), except oneDNN's packed linear (``ONEDNN_PACKED_LINEAR`` stays as detected:
its bf16 kernel refuses to run without AVX-512). Ops that aten runs inside another op (an emulated
conv's own copies) are listed under the caller's line too.
"""

from __future__ import annotations

import collections
import os
import traceback
from pathlib import Path
from typing import Any

import torch
from step_options import step_config, step_parser
from torch.utils._python_dispatch import TorchDispatchMode

import cvt
from cvt.errors import run_script
from cvt.models import cpu_kernels, create_model
from cvt.precision import autocast

# the package's own folder: matching a bare "/cvt/" would also take in a checkout folder named cvt
# (this script, the virtual environment's torch)
PACKAGE_PREFIX = str(Path(cvt.__file__).parent) + os.sep


def in_package(filename: str) -> bool:
    """Whether a stack frame's file is one of this package's modules."""
    return filename.startswith(PACKAGE_PREFIX)


class OpCensus(TorchDispatchMode):
    """Counts ``(calling file, line, op, input shapes, input dtypes)`` of the ``ops`` (all if empty)."""

    def __init__(self, ops: set[str]) -> None:
        super().__init__()
        self.ops = ops
        self.counts: collections.Counter[tuple[str, int, str, str, str]] = collections.Counter()

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        name = func.__name__.split(".")[0]
        if not self.ops or name in self.ops:
            flat = [t for a in args for t in (a if isinstance(a, (list, tuple)) else (a,))]  # cat's list
            tensors = [t for t in flat if isinstance(t, torch.Tensor)]
            shapes = " ".join(str(tuple(t.shape)) for t in tensors[:3])
            dtypes = " ".join(str(t.dtype).removeprefix("torch.") for t in tensors[:3])
            ours = [f for f in traceback.extract_stack() if in_package(f.filename)]
            file, line = (ours[-1].filename.rsplit("/", 1)[-1], ours[-1].lineno or 0) if ours else ("-", 0)
            self.counts[(file, line, name, shapes, dtypes)] += 1
        return func(*args, **(kwargs or {}))


def main() -> int:
    parser = step_parser(__doc__)
    parser.set_defaults(batch_size=2, dtype="bf16")
    parser.add_argument("--bf16-kernels", choices=("yes", "no", "detected"), default="detected")
    parser.add_argument(
        "--ops", default="_to_copy,copy_,cat,clone", help="aten op names (comma-separated) or all"
    )
    args = parser.parse_args()
    cfg = step_config(args)
    if args.bf16_kernels != "detected":
        cpu_kernels.CPU_HAS_BF16_KERNELS = args.bf16_kernels == "yes"
    torch.manual_seed(0)
    model = create_model(args.model).train(args.mode == "train")
    x = torch.randn(args.batch_size, 3, *cfg.measured_size)
    census = OpCensus(set() if args.ops == "all" else set(args.ops.split(",")))
    with torch.set_grad_enabled(args.mode == "train"), autocast("cpu", args.dtype):
        model(x)  # warm the caches of derived weights: the census is of a steady-state call
        with census:
            out = model(x)
    if args.mode == "train":
        with census:
            out.float().sum().backward()
    print(f"{args.model} {args.mode} {args.dtype} batch {args.batch_size}, "
          f"bf16 kernels {'yes' if cpu_kernels.CPU_HAS_BF16_KERNELS else 'no'}\n")  # fmt: skip
    print("| calls | op | input shapes | dtypes | called from |\n|---|---|---|---|---|")
    for (file, line, name, shapes, dtypes), n in sorted(census.counts.items()):
        print(f"| {n} | {name} | {shapes} | {dtypes} | {file}:{line} |")
    print(f"\n{sum(census.counts.values())} ops in all")
    return 0


if __name__ == "__main__":
    run_script(main, "op_census.py")
