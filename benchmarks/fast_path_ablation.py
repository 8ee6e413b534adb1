"""What each fast path buys: CvT-13 img/s with every fast path on, each one off, and all off.

Each variant runs its own copy of one model (same weights) on one input, and their timed runs are
interleaved, so background load hits them alike (the machine this was written on was shared; rerun
on a quiet one):

    .venv/bin/python benchmarks/fast_path_ablation.py                 # inference fp32, batch 8
    .venv/bin/python benchmarks/fast_path_ablation.py --mode train --batch-size 16
    .venv/bin/python benchmarks/fast_path_ablation.py --flags fused_attn,dw_fp32 --dtype bf16
"""

from __future__ import annotations

import copy
import functools

import torch
from step_options import step_config, step_parser
from torch import nn

from cvt.benchmark import interleaved_medians, make_batch, make_step
from cvt.errors import run_script
from cvt.models import create_model
from cvt.models.layers import FAST_PATH_FLAGS, set_fast_paths


def variants(toggled: list[str]) -> dict[str, dict[str, bool]]:
    """Name → flags for :func:`set_fast_paths`: all on, each of ``toggled`` off in turn, all off."""
    table = {"all fast paths": {f: True for f in FAST_PATH_FLAGS}}
    for flag in toggled:
        table[f"without {flag}"] = {f: f != flag for f in FAST_PATH_FLAGS}
    table["reference (all off)"] = {f: False for f in FAST_PATH_FLAGS}
    return table


def main() -> int:
    parser = step_parser(__doc__)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--flags", default=",".join(FAST_PATH_FLAGS), help="fast paths to switch off in turn")
    args = parser.parse_args()
    toggled = args.flags.split(",")
    unknown = sorted(set(toggled) - set(FAST_PATH_FLAGS))
    if unknown:
        parser.error(f"unknown fast path(s) {unknown}; known: {', '.join(FAST_PATH_FLAGS)}")
    cfg = step_config(args)
    torch.manual_seed(0)
    model: nn.Module = create_model(args.model)
    x, target = make_batch(cfg, model.num_classes)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    table = variants(toggled)
    # one copy of the model per variant, its flags set once: set_fast_paths drops the derived weights
    # (folded, cast, packed), which switching one model back and forth would rebuild in every timed run
    steps = {
        name: make_step(set_fast_paths(copy.deepcopy(model), **flags), cfg) for name, flags in table.items()
    }
    calls = {name: functools.partial(step, x, target) for name, step in steps.items()}
    calls["all fast paths + channels-last input"] = functools.partial(steps["all fast paths"], x_cl, target)
    seconds = interleaved_medians(calls, args.runs)  # after one warm-up call each
    base = seconds["reference (all off)"]
    threads = torch.get_num_threads()
    height, width = cfg.measured_size
    print(f"{args.model} {height}x{width} {args.mode} {args.dtype} batch {args.batch_size}, "
          f"{threads} threads, {args.runs} interleaved runs (median)\n")  # fmt: skip
    print("| variant | img/s | vs reference |\n|---|---|---|")
    for name, t in seconds.items():
        print(f"| {name} | {args.batch_size / t:.2f} | {base / t:.2f}x |")
    return 0


if __name__ == "__main__":
    run_script(main, "fast_path_ablation.py")
