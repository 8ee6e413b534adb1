"""Throughput, peak memory and achieved GFLOP/s of a CvT and its peers, measured the same way.

One *subject* is a model to time: ``cvt`` (this package), ``hf`` (transformers'
``CvtForImageClassification`` built from the same configuration and loaded with the same weights) or
``official`` (``benchmarks/official_reference.py``: the official algorithm re-implemented, checked to
give this package's logits). All subjects of one call run in the same process with the same input,
and their timed runs are interleaved (one run of each in turn, each round starting one subject
further on since 2026-11-29), so background load on a shared machine, and what a run inherits from
the run before it, hit all of them alike.

- ``infer``: a forward pass under ``torch.inference_mode`` in eval mode;
- ``train``: forward, cross-entropy, backward and an SGD (momentum 0.9) step in train mode.
- ``bf16``/``fp16``: the fp32 model under ``torch.autocast`` (the usual mixed-precision recipe).
- GFLOP/s: 2 x the multiply-accumulates of ``cvt.complexity`` per image (x3 for a training step:
  backward costs two forwards), divided by the median time; the ceiling is the fastest square matrix
  product (1024 and 2048, fastest of 5 runs each) in the same dtype on the same device and threads (not
  measured for bf16 on a CPU without bf16
  kernels, where one product takes a minute). The MACs are the whole network's for every subject
  (cvt's own forward skips the last block's unused tokens, 6.5 % of CvT-13), so it is an effective rate.
- peak memory: what one subject's step allocates at its peak above what was allocated just before it:
  activations, gradients, the optimizer's momentum buffers (a fresh optimizer: they are created in the
  step) and temporaries, but not the weights, the inputs or anything else in the process. On CUDA it
  is ``max_memory_allocated - memory_allocated`` over one extra step per subject, taken after the
  timed runs (with CUDA graphs, ``reduce-overhead``, memory the graphs hold from their recording is
  in that baseline); on CPU a fresh subprocess per subject runs two steps and reports its peak RSS
  (``VmHWM``) minus its RSS just before the first measured step (in-process deltas would be hidden by
  whichever subject ran first). One step runs before that baseline, eager or compiled alike, so the figure is
  neither the compiler's nor first-call allocations'.

Where things are (this package re-exports what the ``cvt bench`` command and ``benchmarks/`` use):

- :mod:`~cvt.benchmark.config`: what to measure (:class:`BenchConfig`) and what comes out
  (:class:`BenchResult`);
- :mod:`~cvt.benchmark.machine`: the machine's facts reported with every figure, and the matrix-product
  ceiling;
- :mod:`~cvt.benchmark.subjects`: building the subjects with the same weights, and the official peer's
  logits check;
- :mod:`~cvt.benchmark.timing`: steps, batches, interleaved timed runs (with the CUDA peak memory) and
  per-round speed-ups;
- :mod:`~cvt.benchmark.memory`: the CPU peak memory, measured in a subprocess from Linux's ``/proc``;
- here: :func:`run_benchmark`, which measures the subjects of one configuration with all of the above.
"""

from __future__ import annotations

import statistics

import torch

from cvt.benchmark.config import BenchConfig, BenchResult
from cvt.benchmark.machine import (
    ceiling_skip_reason,
    describe_machine,
    has_bf16_kernels,
    logical_cpus,
    machine_info,
    matmul_ceiling,
)
from cvt.benchmark.memory import peak_rss_mb, peak_step_memory_mb, settled_rss_mb
from cvt.benchmark.subjects import SUBJECTS, build_subjects
from cvt.benchmark.timing import (
    interleaved_medians,
    make_batch,
    make_step,
    per_round_speedups,
    time_subjects,
    timed_run,
)

__all__ = [
    "SUBJECTS",
    "BenchConfig",
    "BenchResult",
    "build_subjects",
    "ceiling_skip_reason",
    "describe_machine",
    "has_bf16_kernels",
    "interleaved_medians",
    "logical_cpus",
    "machine_info",
    "make_batch",
    "make_step",
    "matmul_ceiling",
    "peak_rss_mb",
    "peak_step_memory_mb",
    "per_round_speedups",
    "run_benchmark",
    "settled_rss_mb",
    "time_subjects",
    "timed_run",
]


def run_benchmark(
    cfg: BenchConfig, compare: list[str] | None = None, include_cvt: bool = True
) -> list[BenchResult]:
    """Measure this package's model and, optionally, peers (``hf``, ``official``) under ``cfg``;
    ``include_cvt=False`` measures the peers alone."""
    from cvt.complexity import count_gmacs
    from cvt.models import create_model

    cfg.check()
    names = [*(["cvt"] if include_cvt else []), *(compare or [])]
    subjects, num_classes = build_subjects(cfg, names)
    with torch.device("meta"):  # shapes only: counting needs no weights
        network = create_model(cfg.model)
    flops_per_image = 2e9 * count_gmacs(network, cfg.measured_size) * (3 if cfg.mode == "train" else 1)
    times, cuda_peaks = time_subjects(cfg, subjects, num_classes)
    skip_reason = ceiling_skip_reason(cfg.dtype, cfg.device)
    ceiling = None if skip_reason else matmul_ceiling(cfg.dtype, cfg.device)
    results = []
    for name in names:
        rates = [cfg.batch_size / t for t in times[name]]
        median = cfg.batch_size / statistics.median(times[name])  # = the median rate for odd runs
        if not cfg.measure_memory:
            memory = None
        elif cfg.device.startswith("cuda"):
            memory = cuda_peaks[name]
        else:
            memory = peak_step_memory_mb(cfg, name)
        achieved = flops_per_image * median / 1e9
        results.append(
            BenchResult(
                subject=name,
                img_per_s=median,
                img_per_s_min=min(rates),
                img_per_s_max=max(rates),
                img_per_s_runs=rates,
                spread_pct=100 * (max(rates) - min(rates)) / median,
                step_ms=1e3 * statistics.median(times[name]),
                peak_memory_mb=memory,
                gflops_per_s=achieved,
                ceiling_gflops_per_s=ceiling,
                ceiling_fraction=None if ceiling is None else achieved / ceiling,
                ceiling_not_measured=skip_reason,
            )
        )
    return results
