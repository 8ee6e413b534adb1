"""Peak memory of one step on CPU: :func:`peak_step_memory_mb` runs :func:`_memory_worker` in a fresh
subprocess per subject, which reports its peak RSS above a settled baseline, both read from Linux's
``/proc`` (what the figure holds: :mod:`cvt.benchmark`). On CUDA the peak is taken in
:func:`~cvt.benchmark.timing.time_subjects`."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import mmap
import subprocess
import sys
from pathlib import Path

import torch

from cvt.allocator import return_freed_memory
from cvt.benchmark.config import BenchConfig, out_of_memory_error
from cvt.benchmark.subjects import build_subjects
from cvt.benchmark.timing import make_batch, make_step

# where CPU peak memory is read (Linux): statm (RSS), status (VmHWM, the peak), clear_refs (its reset)
PROC_SELF = Path("/proc/self")


def _rss_mb() -> float:
    """Current resident set size of this process, in MB (Linux ``/proc``)."""
    pages = int((PROC_SELF / "statm").read_text().split()[1])
    return pages * mmap.PAGESIZE / 2**20


def peak_rss_mb() -> float:
    """Peak resident set size of this process image, in MB.

    ``VmHWM`` starts afresh at ``exec``; ``ru_maxrss`` would not: Linux carries it over from the
    parent, so a small worker would report the benchmark process's own peak.
    """
    for line in (PROC_SELF / "status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"{PROC_SELF / 'status'} has no VmHWM line")


def settled_rss_mb() -> float:
    """This process's RSS in MB once the memory freed so far is returned to the OS, with the peak RSS
    reset to it: the baseline of a step's peak.

    Under glibc, memory freed by building the subjects (the official peer's logit check, the cvt model
    it was copied from) stays resident, enters the baseline and is reused by the step, which would
    under-report that step's peak; a compilation's own peak would count as the step's.
    """
    gc.collect()
    return_freed_memory()
    # Linux >= 4.0: VmHWM restarts from the current RSS; elsewhere the peak also covers the building
    with contextlib.suppress(OSError):
        (PROC_SELF / "clear_refs").write_text("5")
    return _rss_mb()


def peak_step_memory_mb(cfg: BenchConfig, subject: str) -> float:
    """Peak memory of ``cfg``'s step for one subject, in MB (see :mod:`cvt.benchmark` for what it
    holds), measured in a subprocess with this process's torch thread count."""
    if cfg.device.startswith("cuda"):
        raise ValueError("on CUDA the peak comes from the timed runs")
    request = json.dumps(
        {"cfg": dataclasses.asdict(cfg), "subject": subject, "threads": torch.get_num_threads()}
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, cvt.benchmark.memory as m; m._memory_worker(sys.argv[1])",
            request,
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        if "can't allocate memory" in proc.stderr or "MemoryError" in proc.stderr or proc.returncode < 0:
            raise out_of_memory_error(
                cfg, RuntimeError(proc.stderr.strip().splitlines()[-1] if proc.stderr else "")
            )
        raise RuntimeError(f"memory measurement of {subject} failed:\n{proc.stderr[-2000:]}")
    return float(proc.stdout.strip().splitlines()[-1])


def _memory_worker(request: str) -> None:
    """Subprocess entry: build one subject, run one step, take the baseline RSS, run two more steps,
    print their peak RSS minus that baseline (MB)."""
    data = json.loads(request)
    torch.set_num_threads(data["threads"])
    fields = data["cfg"]
    if fields["img_size"] is not None:  # JSON made the tuple a list
        fields["img_size"] = tuple(fields["img_size"])
    cfg = dataclasses.replace(BenchConfig(), **fields)
    subjects, num_classes = build_subjects(cfg, [data["subject"]])
    model = subjects[data["subject"]]
    batch = make_batch(cfg, num_classes)
    if cfg.compile:
        model = torch.compile(model, mode=cfg.compile_mode)
    # one step before the baseline, eager or compiled alike: first-call allocations (and a compilation)
    # are not the step's; that step's optimizer is dropped, so the measured steps create their
    # momentum buffers again
    make_step(model, cfg)(*batch)
    step = make_step(model, cfg)
    before = settled_rss_mb()
    for _ in range(2):
        step(*batch)
    print(peak_rss_mb() - before)
