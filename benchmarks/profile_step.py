"""Where the time of one CvT forward (and backward) goes: torch.profiler by stage and by op.

    .venv/bin/python benchmarks/profile_step.py                      # inference, fp32, batch 8
    .venv/bin/python benchmarks/profile_step.py --mode train --batch-size 16

Stages are labelled with ``record_function`` through forward hooks (the model itself carries no
profiling code); backward ops run outside those labels and are reported by op only.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from cvt.benchmark import BenchConfig, make_batch, make_step, step_parser
from cvt.models import create_model


def label_stages(model: torch.nn.Module) -> None:
    """Open a ``record_function("stageN")`` range around each stage's forward."""
    for i, stage in enumerate(model.stages):
        ranges: list[Any] = []

        def enter(_m: Any, _inp: Any, name: str = f"stage{i}", ranges: list[Any] = ranges) -> None:
            ranges.append(record_function(name))
            ranges[-1].__enter__()

        def leave(_m: Any, _inp: Any, _out: Any, ranges: list[Any] = ranges) -> None:
            ranges.pop().__exit__(None, None, None)

        stage.register_forward_pre_hook(enter)
        stage.register_forward_hook(leave)


def main() -> int:
    parser = step_parser(__doc__)
    parser.add_argument("--rows", type=int, default=15)
    args = parser.parse_args()
    cfg = BenchConfig(model=args.model, batch_size=args.batch_size, mode=args.mode, dtype=args.dtype)
    torch.manual_seed(0)
    model = create_model(args.model)
    step = make_step(model, cfg)
    batch = make_batch(cfg, model.num_classes)
    step(*batch)  # warm-up: oneDNN primitive creation, allocator
    label_stages(model)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step(*batch)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    print(f"{args.model} {args.mode} {args.dtype} batch {args.batch_size}: {total / 1e3:.0f} ms profiled\n")
    print("| stage (forward) | ms | share |\n|---|---|---|")
    for e in sorted((e for e in events if e.key.startswith("stage")), key=lambda e: e.key):
        print(f"| {e.key} | {e.cpu_time_total / 1e3:.0f} | {100 * e.cpu_time_total / total:.0f}% |")
    print("\n| op | self ms | share | calls |\n|---|---|---|---|")
    ops = sorted((e for e in events if not e.key.startswith("stage")), key=lambda e: -e.self_cpu_time_total)
    for e in ops[: args.rows]:
        share = 100 * e.self_cpu_time_total / total
        print(f"| {e.key} | {e.self_cpu_time_total / 1e3:.0f} | {share:.1f}% | {e.count} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
