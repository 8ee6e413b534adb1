"""``cvt bench``: throughput, peak memory and GFLOP/s of a variant, optionally against its peers."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from cvt.cli.common import parse_img_size, print_json
from cvt.tables import format_table

if TYPE_CHECKING:  # cvt.benchmark imports torch: loaded when the command runs, not for `cvt --help`
    from cvt.benchmark import BenchResult

COMPARE_CHOICES = {"hf": ["hf"], "official": ["official"], "all": ["hf", "official"]}

# what the GFLOP/s column counts (cvt.benchmark's module docstring)
GFLOPS_BASIS = (
    "the whole network's multiply-accumulates per image for every implementation (x3 for a training "
    "step); cvt's forward skips the last block's unused tokens (6.5 % of CvT-13's), so its figure is an "
    "effective rate"
)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``bench`` subcommand."""
    p = subparsers.add_parser(
        "bench",
        help="measure img/s, peak memory and GFLOP/s (optionally against transformers / official)",
        description="Warm-up, then interleaved timed runs of each model; prints the median img/s and its "
        "spread, peak memory of one step above what was allocated before it (CUDA allocator, or peak "
        "RSS of a fresh process on CPU), achieved GFLOP/s and its fraction of a measured "
        "matrix-product ceiling (the fastest run of square products of 1024 and 2048).",
    )
    p.add_argument("--model", default="cvt_13",
                   help="variant or arch.tag name, built with random weights (default: cvt_13)")  # fmt: skip
    p.add_argument("--img-size", type=parse_img_size,
                   help="input size N or H,W (default: the model's, e.g. 32 for cvt_tiny)")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=8, help="images per timed step (default 8)")
    p.add_argument(
        "--mode",
        choices=["infer", "train"],
        default="infer",
        help="infer: a forward; train: forward, loss, backward, SGD step (default infer)",
    )
    p.add_argument("--dtype", default="fp32", help="fp32, bf16 or fp16 (autocast; fp16 needs CUDA)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    p.add_argument("--compile", action="store_true", help="torch.compile every measured model")
    p.add_argument("--compile-mode", default="default",
                   help="torch.compile mode with --compile: default, reduce-overhead (CUDA graphs) or "
                   "max-autotune")  # fmt: skip
    p.add_argument("--channels-last", action="store_true", help="channels-last input and conv weights")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute blocks in backward (cvt)")
    p.add_argument(
        "--compare",
        choices=sorted(COMPARE_CHOICES),
        help="also measure peer(s) in this process (official: from a source checkout only)",
    )
    p.add_argument("--warmup", type=int, default=2, help="untimed runs per model (default 2)")
    p.add_argument("--runs", type=int, default=5, help="timed runs per model (default 5)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument(
        "--keep-freed-memory",
        action="store_true",
        help="glibc keeps freed memory for reuse (cvt.allocator.keep_freed_memory): no subject pays page "
        "faults for memory an earlier step returned to the kernel (otherwise how often each does depends "
        "on what ran before it in the process)",
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run_bench)


def run_bench(args: argparse.Namespace) -> int:
    """``cvt bench``: measure, print the table (or JSON); the exit status."""
    import torch

    from cvt.allocator import keep_freed_memory
    from cvt.benchmark import (
        BenchConfig,
        describe_machine,
        logical_cpus,
        machine_info,
        per_round_speedups,
        run_benchmark,
    )
    from cvt.devices import resolve_device
    from cvt.errors import UsageError

    if args.threads is not None:
        if args.threads < 1:
            raise UsageError(f"--threads must be >= 1, got {args.threads}")
        cpus = logical_cpus()
        # more threads than CPUs time the OS's scheduling, not the model (and far more crash libgomp)
        if args.threads > cpus:
            raise UsageError(
                f"--threads must be at most the {cpus} logical CPU(s) this process may use, "
                f"got {args.threads}"
            )
        torch.set_num_threads(args.threads)
    if args.keep_freed_memory:
        keep_freed_memory()
    device = str(resolve_device(args.device))
    cfg = BenchConfig(
        model=args.model, img_size=args.img_size, batch_size=args.batch_size, mode=args.mode,
        dtype=args.dtype, compile=args.compile, compile_mode=args.compile_mode,
        channels_last=args.channels_last, grad_checkpointing=args.grad_checkpointing,
        warmup=args.warmup, runs=args.runs, device=device,
        measure_memory=not args.no_memory,
    )  # fmt: skip
    peers = COMPARE_CHOICES[args.compare] if args.compare else []
    results = run_benchmark(cfg, peers)
    machine = machine_info(device, peers)
    ours = results[0]
    height, width = cfg.measured_size  # the model's own unless --img-size
    if args.json:
        report = {
            "config": {
                **vars(cfg),
                "img_size": [height, width],
                "threads": torch.get_num_threads(),
                "keep_freed_memory": args.keep_freed_memory,
            },
            "machine": machine,
            "results": [r.as_dict() for r in results],
            "speedup": {r.subject: ours.img_per_s / r.img_per_s for r in results[1:]},
            "speedup_per_round": {r.subject: per_round_speedups(ours, r) for r in results[1:]},
            "gflops_basis": GFLOPS_BASIS,
        }
        print_json(report)
        return 0
    rows = [
        [r.subject, f"{r.img_per_s:.2f}", f"{r.img_per_s_min:.2f}-{r.img_per_s_max:.2f}",
         "-" if r.peak_memory_mb is None else f"{r.peak_memory_mb:.0f}",
         f"{r.gflops_per_s:.1f}", "-" if r.ceiling_fraction is None else f"{100 * r.ceiling_fraction:.0f}%",
         "1.00x" if r is ours else _speedup_cell(ours, r)]
        for r in results
    ]  # fmt: skip
    if ours.ceiling_gflops_per_s is None:
        ceiling = f"matmul ceiling not measured: {ours.ceiling_not_measured}"
    else:
        ceiling = f"matmul ceiling {ours.ceiling_gflops_per_s:.0f} GFLOP/s"
    allocator = ", freed memory kept in the timed runs" if args.keep_freed_memory else ""
    options = [f"compile ({cfg.compile_mode})"] * cfg.compile + ["channels-last"] * cfg.channels_last
    options += ["gradient checkpointing (cvt only)"] * cfg.grad_checkpointing
    print(
        f"{cfg.model} {height}x{width} batch {cfg.batch_size} {cfg.mode} {cfg.dtype}"
        f"{''.join(', ' + option for option in options)} "
        f"on {device} ({torch.get_num_threads()} threads{allocator}), {cfg.runs} runs; {ceiling}"
    )
    print(f"Machine: {describe_machine(machine)}")
    headers = ["model", "img/s", "min-max", "peak MB", "GFLOP/s", "of ceiling", "cvt speed-up (per round)"]
    print(format_table(headers, rows))
    print(f"GFLOP/s: {GFLOPS_BASIS}")
    return 0


def _speedup_cell(ours: BenchResult, peer: BenchResult) -> str:
    """``1.29x (0.96-1.54)``: ours over the peer's median img/s, and the range over rounds of runs."""
    from cvt.benchmark import per_round_speedups

    rounds = per_round_speedups(ours, peer)
    return f"{ours.img_per_s / peer.img_per_s:.2f}x ({min(rounds):.2f}-{max(rounds):.2f})"
