r"""Measure the speed and memory targets of issue 4 and print them as a Markdown table.

CvT-13 at 224 against transformers' ``CvtForImageClassification`` (same configuration and weights)
and the official algorithm re-implemented (``official_reference.py``), in the same process with
interleaved timed runs (see ``cvt.benchmark``); the GPU rows, whose two sides differ in dtype and
compilation, time them one after the other instead:

    .venv/bin/python benchmarks/run_targets.py            # ~4 min on a quiet 2-core CPU
    .venv/bin/python benchmarks/run_targets.py --runs 5 --json targets.json
    .venv/bin/python benchmarks/run_targets.py --keep-freed-memory   # no implementation page-faults
    taskset -c 0,1 python benchmarks/run_targets.py --device cpu --threads 2   # 2 cores of a bigger CPU
    python benchmarks/run_targets.py --device cuda --only gpu --compile-mode reduce-overhead \
        --gpu-train-batches 16 --gpu-infer-batches 8

bf16 rows need a CPU where oneDNN has bf16 kernels (AVX-512; natively AVX512-BF16 / AMX) or a GPU;
elsewhere bf16 is emulated, takes many minutes and says nothing about the implementations, so it is
skipped unless ``--force-bf16``. On CUDA the GPU targets (bf16 + compile vs transformers fp32 eager,
at the issue's batch sizes and at large ones) run too. ``--only speed,memory,gpu`` picks sections.
Results measured with it: ``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys

import torch

from cvt.allocator import keep_freed_memory
from cvt.benchmark import (
    BenchConfig,
    BenchResult,
    describe_machine,
    has_bf16_kernels,
    machine_info,
    peak_step_memory_mb,
    per_round_speedups,
    run_benchmark,
)
from cvt.devices import resolve_device
from cvt.errors import run_script
from cvt.models import create_model
from cvt.precision import autocast

PEERS = ["hf", "official"]


@dataclasses.dataclass
class Row:
    """One line of the table: a measured figure for each implementation and the target check."""

    name: str
    values: dict[str, float]  # subject -> img/s (or MB for memory rows)
    ratio: float  # cvt relative to the reference named in `versus`
    versus: str
    target: str  # e.g. ">= 1.25x"
    met: bool
    note: str = ""
    # speed rows: cvt over the faster peer in each round of interleaved runs (per_round_speedups)
    paired_ratios: list[float] = dataclasses.field(default_factory=list)


def speed_row(name: str, results: list[BenchResult], minimum: float, note: str = "") -> Row:
    """cvt's img/s against the faster peer."""
    values = {r.subject: r.img_per_s for r in results}
    faster = max(PEERS, key=lambda p: values[p])
    ratio = values["cvt"] / values[faster]
    by_subject = {r.subject: r for r in results}
    paired = per_round_speedups(by_subject["cvt"], by_subject[faster])
    return Row(name, values, ratio, faster, f">= {minimum}x", ratio >= minimum, note, paired)


def bf16_logit_error(device: str, img_size: int = 224, batch: int = 8) -> float:
    """Relative L2 error of CvT-13 logits under bf16 autocast against fp32 (random weights)."""
    torch.manual_seed(0)
    model = create_model("cvt_13").to(device).eval()
    x = torch.randn(batch, 3, img_size, img_size, device=device)
    with torch.inference_mode():
        fp32 = model(x)
        with autocast(torch.device(device).type, "bf16"):
            bf16 = model(x).float()
    return ((bf16 - fp32).norm() / fp32.norm()).item()


SECTIONS = ("speed", "memory", "gpu")


def base_config(args: argparse.Namespace) -> BenchConfig:
    """CvT-13 at 224 on the chosen device; each row changes batch, mode, dtype or compilation."""
    return BenchConfig(model="cvt_13", img_size=(224, 224), warmup=args.warmup, runs=args.runs,
                       device=args.device, measure_memory=False)  # fmt: skip


def speed_rows(args: argparse.Namespace) -> list[Row]:
    """cvt against both peers under the same dtype and mode (fp32; bf16 where it runs on bf16 kernels)."""
    base = base_config(args)
    bf16 = args.force_bf16 or has_bf16_kernels(args.device)
    rows = []

    def bench(**changes: object) -> list[BenchResult]:
        cfg = dataclasses.replace(base, **changes)
        print(f"measuring {cfg.mode} {cfg.dtype} batch {cfg.batch_size} ...", file=sys.stderr, flush=True)
        return run_benchmark(cfg, PEERS)

    rows.append(speed_row("inference fp32, batch 8", bench(batch_size=8), 1.25))
    if bf16:
        err = bf16_logit_error(args.device)
        rows.append(
            speed_row("inference bf16 autocast, batch 8", bench(batch_size=8, dtype="bf16"), 1.4,
                      note=f"logits rel. error vs fp32 {100 * err:.2f}% (target <= 2%)")
        )  # fmt: skip
    rows.append(speed_row("train step fp32, batch 16", bench(batch_size=16, mode="train"), 1.2))
    if bf16:
        rows.append(speed_row("train step bf16 autocast, batch 16",
                              bench(batch_size=16, mode="train", dtype="bf16"), 1.3))  # fmt: skip
    return rows


def memory_rows(args: argparse.Namespace) -> list[Row]:
    """Peak memory of a training step at batch 16 against the official algorithm."""
    train16 = dataclasses.replace(base_config(args), batch_size=16, mode="train")
    if args.device.startswith("cuda"):  # each step's peak above what was allocated before it
        mem_cfg = dataclasses.replace(train16, measure_memory=True, runs=1)
        peaks = {r.subject: r.peak_memory_mb for r in run_benchmark(mem_cfg, ["official"])}
        official_mb, ours_mb = peaks["official"], peaks["cvt"]
        gc_cfg = dataclasses.replace(mem_cfg, grad_checkpointing=True)
        ours_gc_mb = run_benchmark(gc_cfg)[0].peak_memory_mb
    else:
        print("measuring peak train memory (fresh processes) ...", file=sys.stderr, flush=True)
        official_mb = peak_step_memory_mb(train16, "official")
        ours_mb = peak_step_memory_mb(train16, "cvt")
        ours_gc_mb = peak_step_memory_mb(dataclasses.replace(train16, grad_checkpointing=True), "cvt")
    rows = []
    for name, mb, limit in (("peak train memory, batch 16 (MB)", ours_mb, 0.75),
                            ("... with gradient checkpointing (MB)", ours_gc_mb, 0.5)):  # fmt: skip
        ratio = mb / official_mb
        rows.append(Row(name, {"cvt": mb, "official": official_mb}, ratio, "official", f"<= {limit}x",
                        ratio <= limit))  # fmt: skip
    return rows


def gpu_rows(args: argparse.Namespace) -> list[Row]:
    """cvt bf16 + compile against transformers fp32 eager, at the issue's batch sizes (launch-bound
    on a GPU) and at large ones. The two differ in dtype and compilation, which one call of
    ``run_benchmark`` cannot mix: transformers is timed first, then cvt, not interleaved."""
    base = base_config(args)
    rows = []
    for mode, minimum, batches in (
        ("train", 2.0, args.gpu_train_batches),
        ("infer", 3.0, args.gpu_infer_batches),
    ):
        for b in batches:
            cfg = dataclasses.replace(base, batch_size=b, mode=mode)
            what = f"hf fp32 eager, cvt bf16 + compile ({args.compile_mode})"
            print(f"measuring GPU {mode} batch {b}: {what}", file=sys.stderr, flush=True)
            hf = run_benchmark(cfg, ["hf"], include_cvt=False)[0]
            fast = run_benchmark(dataclasses.replace(cfg, dtype="bf16", compile=True,
                                                     compile_mode=args.compile_mode))[0]  # fmt: skip
            values = {"cvt": fast.img_per_s, "hf": hf.img_per_s}
            ratio = values["cvt"] / values["hf"]
            rows.append(Row(f"GPU {mode} bf16+compile ({args.compile_mode}) vs hf fp32 eager, batch {b}",
                            values, ratio, "hf", f">= {minimum}x", ratio >= minimum))  # fmt: skip
    return rows


def measure(args: argparse.Namespace) -> list[Row]:
    """Every selected target of the issue that this machine can measure."""
    rows = []
    if "speed" in args.only:
        rows += speed_rows(args)
    if "memory" in args.only:
        rows += memory_rows(args)
    if "gpu" in args.only and args.device.startswith("cuda"):
        rows += gpu_rows(args)
    return rows


def markdown(rows: list[Row]) -> str:
    """The rows as a Markdown table."""
    lines = ["| measurement | cvt | transformers | official (re-impl.) | cvt vs | per round | target | met |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        cells = [f"{r.values[s]:.1f}" if s in r.values else "-" for s in ("cvt", "hf", "official")]
        p = sorted(r.paired_ratios)
        rounds = f"{p[0]:.2f}-{statistics.median(p):.2f}-{p[-1]:.2f}" if p else "-"
        lines.append(f"| {r.name} | {' | '.join(cells)} | {r.ratio:.2f}x {r.versus} | {rounds} | "
                     f"{r.target} | {'yes' if r.met else 'NO'} |")  # fmt: skip
    lines += [f"| {r.name}: {r.note} |" for r in rows if r.note]
    return "\n".join(lines)


def _sections(text: str) -> list[str]:
    names = text.split(",")
    unknown = sorted(set(names) - set(SECTIONS))
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown section(s) {unknown}; choose from {SECTIONS}")
    return names


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",")]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per implementation")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--force-bf16", action="store_true", help="measure bf16 even where it is emulated")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    parser.add_argument(
        "--keep-freed-memory",
        action="store_true",
        help="glibc keeps freed memory (cvt.allocator): no implementation pays page faults that depend on "
        "what ran before it (the memory rows run in fresh processes either way)",
    )
    parser.add_argument(
        "--only",
        type=_sections,
        default=list(SECTIONS),
        help=f"comma-separated sections to measure, of {','.join(SECTIONS)} (default all)",
    )
    parser.add_argument("--compile-mode", default="default", help="torch.compile mode of the GPU rows")
    parser.add_argument("--gpu-train-batches", type=_ints, default=[16, 128], help="GPU rows, e.g. 16,128")
    parser.add_argument("--gpu-infer-batches", type=_ints, default=[8, 256], help="GPU rows, e.g. 8,256")
    args = parser.parse_args()
    args.device = str(resolve_device(args.device))
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.keep_freed_memory:
        keep_freed_memory()
    rows = measure(args)
    info = machine_info(args.device, PEERS)
    machine = describe_machine(info) + (", freed memory kept (glibc)" if args.keep_freed_memory else "")
    print(f"Machine: {machine}; units: img/s (memory rows: MB); {args.runs} runs, median (CPU rows: "
          "interleaved; GPU rows: one side after the other); per round: cvt over the faster peer in each "
          "round of runs, min-median-max\n")  # fmt: skip
    print(markdown(rows))
    if "speed" in args.only and not (args.force_bf16 or has_bf16_kernels(args.device)):
        print(
            "\nbf16 rows skipped: no bf16 kernels on this device (rerun with --force-bf16 to measure anyway)"
        )
    if args.json:
        with open(args.json, "w") as f:
            report = {"machine": machine, "machine_info": info, "rows": [dataclasses.asdict(r) for r in rows]}
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    run_script(main, "run_targets.py")
