"""Where the time of one CvT forward (and backward) goes: torch.profiler by stage and by op.

    .venv/bin/python benchmarks/profile_step.py                      # inference, fp32, batch 8
    .venv/bin/python benchmarks/profile_step.py --mode train --batch-size 16
    .venv/bin/python benchmarks/profile_step.py --subject official --dtype bf16   # a peer: the op table only
    .venv/bin/python benchmarks/profile_step.py --by-shape   # per op and shape, with each product's GFLOP/s

Stages are labelled with ``record_function`` through forward hooks (the model itself carries no
profiling code); backward ops run outside those labels and are reported by op only.
"""

from __future__ import annotations

from typing import Any

import torch
from step_options import step_config, step_parser
from torch.profiler import ProfilerActivity, profile, record_function

from cvt.benchmark import SUBJECTS, build_subjects, make_batch, make_step
from cvt.errors import run_script


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
    parser.add_argument("--subject", choices=SUBJECTS, default="cvt", help="this package or a peer")
    parser.add_argument("--by-shape", action="store_true", help="one row per op and input shapes")
    args = parser.parse_args()
    cfg = step_config(args)
    subjects, num_classes = build_subjects(cfg, [args.subject])
    model = subjects[args.subject]
    step = make_step(model, cfg)
    batch = make_batch(cfg, num_classes)
    step(*batch)  # warm-up: oneDNN primitive creation, allocator
    if args.subject == "cvt":
        label_stages(model)
    # with --by-shape the profiler also counts the FLOPs of the matrix products
    with profile(
        activities=[ProfilerActivity.CPU], record_shapes=args.by_shape, with_flops=args.by_shape
    ) as prof:
        step(*batch)
    events = prof.key_averages(group_by_input_shape=args.by_shape)
    total = sum(e.self_cpu_time_total for e in events)
    height, width = cfg.measured_size
    print(f"{args.subject} {args.model} {height}x{width} {args.mode} {args.dtype} batch {args.batch_size}, "
          f"{torch.get_num_threads()} threads: {total / 1e3:.0f} ms profiled\n")  # fmt: skip
    if args.subject == "cvt":
        print("| stage (forward) | ms | share |\n|---|---|---|")
        for e in sorted((e for e in events if e.key.startswith("stage")), key=lambda e: e.key):
            print(f"| {e.key} | {e.cpu_time_total / 1e3:.0f} | {100 * e.cpu_time_total / total:.0f}% |")
    header = "op (input shapes) | GFLOP/s" if args.by_shape else "op"
    rule = "|---" * (5 if args.by_shape else 4)
    print(f"\n| {header} | self ms | share | calls |\n{rule}|")
    ops = sorted((e for e in events if not e.key.startswith("stage")), key=lambda e: -e.self_cpu_time_total)
    for e in ops[: args.rows]:
        share = 100 * e.self_cpu_time_total / total
        # the rate of each product shape (the profiler counts aten::mm, addmm, bmm; blank for other ops)
        rate = (
            f" | {e.flops / e.self_cpu_time_total / 1e3:.0f}" if e.flops and e.self_cpu_time_total else " | "
        )
        shapes = f" {e.input_shapes}{rate}" if args.by_shape else ""
        print(f"| {e.key}{shapes} | {e.self_cpu_time_total / 1e3:.0f} | {share:.1f}% | {e.count} |")
    return 0


if __name__ == "__main__":
    run_script(main, "profile_step.py")
