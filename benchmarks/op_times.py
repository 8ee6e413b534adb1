"""Wall time of every op of one CvT step, cvt next to its peers, and the floor their linear layers set.

    .venv/bin/python benchmarks/op_times.py --dtype bf16 --threads 2 --target 1.4     # inference, batch 8
    .venv/bin/python benchmarks/op_times.py --mode train --batch-size 16 --dtype bf16 --keep-freed-memory
    .venv/bin/python benchmarks/op_times.py --subjects cvt,hf --rows 20               # top ops by shape

Each op is timed by the wall clock around its call (a ``TorchDispatchMode``: CPU ops run synchronously),
so the op times of a step add up to nearly its plain time. torch.profiler does not here: on the Zen 4 VM
it gave 11-16 ms per call to the stage-3 fc1 that takes 5.2 ms by the clock (docs/performance.md).

The linear layers (``addmm``, ``mm``, oneDNN's linear) are the same products in every implementation
and run near the CPU's matrix-product peak in all of them, so they set a floor: cvt can be at most
``peer step / cvt's linear layers`` times faster than a peer, and only if all its other ops took no
time. With ``--target R`` the script prints how much time cvt's other ops may take to reach ``R``
times the faster peer, against what they take now.
"""

from __future__ import annotations

import collections
import contextlib
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from step_options import step_config, step_parser
from torch.utils._python_dispatch import TorchDispatchMode

from cvt.allocator import keep_freed_memory
from cvt.benchmark import SUBJECTS, build_subjects, make_batch, make_step, timed_run
from cvt.errors import run_script
from cvt.models import cpu_kernels

# op kinds, by the op's name without its overload: the same work in every implementation (linear
# layers), attention (products, softmax, SDPA), convolutions, and the rest. Under inference_mode the
# mode sees composite ops whole (linear, conv2d, einsum, matmul, softmax, SDPA); with autograd, what
# they decompose into (addmm, convolution, bmm, _softmax, SDPA's CPU kernel). None of the three models
# runs a linear layer through matmul or einsum, nor attention through linear; cvt's RecomputedAttention
# (bf16 CPU training) runs attention through mm, which OpTimer counts as attention by where it runs.
LINEAR_OPS = frozenset({"addmm", "mm", "_linear_pointwise", "linear"})
ATTENTION_OPS = frozenset(
    {"bmm", "baddbmm", "matmul", "einsum", "softmax", "_softmax", "_softmax_backward_data"}
)
CONV_OPS = frozenset({"conv2d", "convolution", "convolution_backward", "mkldnn_convolution"})
KINDS = ("linear layers", "attention", "convolutions", "other ops")


def op_kind(name: str) -> str:
    """The kind (one of :data:`KINDS`) of an op named ``name`` (``"addmm"``, ``"_softmax"``, ...)."""
    if name in LINEAR_OPS:
        return "linear layers"
    if name in ATTENTION_OPS or name.lstrip("_").startswith("scaled_dot_product"):  # SDPA, its kernels
        return "attention"
    return "convolutions" if name in CONV_OPS else "other ops"


class OpTimer(TorchDispatchMode):
    """Adds up the wall time of each ``(op name, input shapes)`` called while the mode is active.

    Ops that an op runs inside itself are not seen (the mode is off while it handles a call), so
    the times do not overlap and add up to the time spent in aten.
    """

    def __init__(self) -> None:
        super().__init__()
        self.seconds: collections.Counter[tuple[str, str]] = collections.Counter()
        self.calls: collections.Counter[tuple[str, str]] = collections.Counter()
        self.kinds: dict[tuple[str, str], str] = {}  # (op name, shapes) -> its kind of KINDS
        self.region: str | None = None  # a kind that every op counts as while set (attention_region)

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        start = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        elapsed = time.perf_counter() - start
        # sizes only: oneDNN's packed weights are opaque tensors without strides
        shapes = " ".join(str(tuple(a.shape)) for a in args[:3] if isinstance(a, torch.Tensor))
        name = func.__name__.split(".")[0]
        key = (name, shapes) if self.region is None else (f"{name} [{self.region}]", shapes)
        self.kinds.setdefault(key, self.region or op_kind(name))
        self.seconds[key] += elapsed
        self.calls[key] += 1
        return out

    def by_kind(self) -> dict[str, float]:
        """Seconds per op kind, every kind of :data:`KINDS` present."""
        totals = dict.fromkeys(KINDS, 0.0)
        for key, seconds in self.seconds.items():
            totals[self.kinds[key]] += seconds
        return totals


@contextlib.contextmanager
def attention_region(timer: OpTimer) -> Iterator[None]:
    """While active, the ops of cvt's :class:`~cvt.models.cpu_kernels.RecomputedAttention` (forward and
    backward: ``mm``, ``softmax`` … on 2-D blocks) count as attention in ``timer``, not by their names."""

    def counted(method: Callable[..., Any]) -> staticmethod:
        def run(*args: Any) -> Any:
            outer, timer.region = timer.region, "attention"
            try:
                return method(*args)
            finally:
                timer.region = outer

        return staticmethod(run)

    cls = cpu_kernels.RecomputedAttention
    forward, backward = cls.forward, cls.backward
    cls.forward, cls.backward = counted(forward), counted(backward)
    try:
        yield
    finally:
        cls.forward, cls.backward = staticmethod(forward), staticmethod(backward)


def time_ops(step: Callable[[], None], runs: int) -> tuple[float, OpTimer]:
    """The plain median time of ``step`` and an :class:`OpTimer` of ``runs`` more calls (seconds per
    call), after two warm-up calls (oneDNN primitives, cached weights, the allocator)."""
    for _ in range(2):
        step()
    plain = statistics.median(timed_run(step, 1, "cpu") for _ in range(runs))
    timer = OpTimer()
    with timer, attention_region(timer):
        for _ in range(runs):
            step()
    for key in timer.seconds:
        timer.seconds[key] /= runs
        timer.calls[key] //= runs
    return plain, timer


def floor_lines(steps: dict[str, float], ours_linear: float, target: float | None) -> list[str]:
    """What the linear-layer floor allows cvt against the faster peer in ``steps`` (subject -> seconds)."""
    peers = {name: s for name, s in steps.items() if name != "cvt"}
    if "cvt" not in steps or not peers:
        return []
    peer, peer_step = min(peers.items(), key=lambda kv: kv[1])
    lines = [
        f"cvt over the faster peer ({peer}): {peer_step / steps['cvt']:.2f}x measured; at most "
        f"{peer_step / ours_linear:.2f}x if cvt's ops other than its linear layers took no time"
    ]
    if target is not None:
        allowed = peer_step / target - ours_linear
        lines.append(
            f"{target}x needs cvt's step within {1e3 * peer_step / target:.0f} ms: its other ops within "
            f"{1e3 * allowed:.0f} ms (now {1e3 * (steps['cvt'] - ours_linear):.0f} ms)"
        )
    return lines


def main() -> int:
    parser = step_parser(__doc__)
    parser.add_argument("--subjects", default=",".join(SUBJECTS), help="comma-separated: cvt, hf, official")
    parser.add_argument("--runs", type=int, default=3, help="timed steps, plain and under the op timer")
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="glibc keeps freed memory (cvt.allocator.keep_freed_memory)")  # fmt: skip
    parser.add_argument("--rows", type=int, default=0, help="also list each subject's N slowest ops by shape")
    parser.add_argument("--target", type=float, help="a speed-up over the faster peer to check against")
    args = parser.parse_args()
    if args.keep_freed_memory:
        keep_freed_memory()
    cfg = step_config(args)
    subjects, num_classes = build_subjects(cfg, args.subjects.split(","))
    batch = make_batch(cfg, num_classes)
    steps: dict[str, float] = {}
    timers: dict[str, OpTimer] = {}
    for name, model in subjects.items():
        step = make_step(model, cfg)
        steps[name], timers[name] = time_ops(lambda step=step: step(*batch), args.runs)

    height, width = cfg.measured_size
    allocator = ", freed memory kept" if args.keep_freed_memory else ""
    print(f"{args.model} {height}x{width} {args.mode} {args.dtype} batch {args.batch_size}, "
          f"{torch.get_num_threads()} threads{allocator}: ms per step (the plain step: median of {args.runs} "
          f"runs; the ops: mean of {args.runs} more)\n")  # fmt: skip
    print(f"| subject | step | timed ops | {' | '.join(KINDS)} |\n|---|---|---|{'---|' * len(KINDS)}")
    for name, timer in timers.items():
        kinds = timer.by_kind()
        cells = " | ".join(f"{1e3 * kinds[k]:.1f}" for k in KINDS)
        print(f"| {name} | {1e3 * steps[name]:.1f} | {1e3 * sum(kinds.values()):.1f} | {cells} |")
    if "cvt" in timers:
        print("\n" + "\n".join(floor_lines(steps, timers["cvt"].by_kind()["linear layers"], args.target)))
    for name, timer in timers.items() if args.rows else ():
        print(f"\n{name}: slowest ops\n\n| op | input shapes | ms | calls |\n|---|---|---|---|")
        for key, seconds in timer.seconds.most_common(args.rows):
            print(f"| {key[0]} | {key[1]} | {1e3 * seconds:.2f} | {timer.calls[key]} |")
    return 0


if __name__ == "__main__":
    run_script(main, "op_times.py")
