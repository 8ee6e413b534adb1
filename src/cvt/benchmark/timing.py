"""Timing the subjects: one step (:func:`make_step`) on one batch (:func:`make_batch`), timed runs of
steps that include queued GPU work, interleaved rounds of runs of every subject (:func:`time_subjects`,
which also takes the CUDA peak memory of one step) and the speed-ups per round."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from cvt.benchmark.config import BenchConfig, BenchResult, out_of_memory_error
from cvt.errors import is_out_of_memory
from cvt.precision import autocast

# On CUDA one step of a small batch takes milliseconds (a matrix product of the ceiling, microseconds):
# a timed run repeats it until it lasts about this long, so timer resolution and launch jitter do not
# decide the result.
MIN_CUDA_RUN_S = 0.25


def synchronize(device: str) -> None:
    """Wait for queued GPU work, so wall-clock times cover it."""
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def make_step(model: nn.Module, cfg: BenchConfig) -> Callable[[torch.Tensor, torch.Tensor], None]:
    """One timed unit: an inference forward, or a full training step (fwd, loss, bwd, SGD step)."""
    device_type = torch.device(cfg.device).type
    if cfg.mode == "infer":
        model.eval()

        def infer(x: torch.Tensor, _: torch.Tensor) -> None:
            with torch.inference_mode(), autocast(device_type, cfg.dtype):
                model(x)

        return infer
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)

    def train(x: torch.Tensor, target: torch.Tensor) -> None:
        with autocast(device_type, cfg.dtype):
            loss = nn.functional.cross_entropy(model(x), target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return train


def make_batch(cfg: BenchConfig, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A random image batch (channels-last if asked) and random labels."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(cfg.batch_size, 3, *cfg.measured_size, generator=gen).to(cfg.device)
    if cfg.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    target = torch.randint(0, max(num_classes, 1), (cfg.batch_size,), generator=gen).to(cfg.device)
    return x, target


def time_subjects(
    cfg: BenchConfig, subjects: dict[str, nn.Module], num_classes: int
) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Seconds per step of each subject (warm-up, then ``cfg.runs`` interleaved timed runs) and, on
    CUDA, each subject's peak MB over one more step (see :mod:`cvt.benchmark`).

    On CPU a timed run is one step; on CUDA it is as many steps as fill :data:`MIN_CUDA_RUN_S`
    (counted per subject after the warm-up), and the time per step is the run's mean. All subjects
    share one input batch."""
    models = {
        name: torch.compile(model, mode=cfg.compile_mode) if cfg.compile else model
        for name, model in subjects.items()
    }
    steps = {name: make_step(model, cfg) for name, model in models.items()}
    cuda_peaks: dict[str, float] = {}
    try:
        batch = make_batch(cfg, num_classes)  # a batch too large to create is reported as one
        calls = {name: (lambda step=step: step(*batch)) for name, step in steps.items()}
        times = interleaved_times(calls, cfg.runs, cfg.device, cfg.warmup)
        if cfg.device.startswith("cuda") and cfg.measure_memory:
            for name, model in models.items():  # one untimed step each: the runs above are interleaved
                # a fresh optimizer, so its momentum buffers count, as in the CPU figure
                cuda_peaks[name] = _cuda_step_peak_mb(make_step(model, cfg), batch, cfg.device)
    except (RuntimeError, MemoryError) as err:
        if is_out_of_memory(err):
            raise out_of_memory_error(cfg, err) from err
        raise
    return times, cuda_peaks


def _cuda_step_peak_mb(
    step: Callable[[torch.Tensor, torch.Tensor], None], batch: tuple[torch.Tensor, torch.Tensor], device: str
) -> float:
    """Peak MB allocated by one step above what was allocated just before it (the other subjects'
    weights, optimizer state and the input are all in that baseline)."""
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    step(*batch)
    synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def repeats_per_run(fn: Callable[[], object], device: str) -> int:
    """How many calls of ``fn`` one timed run holds: 1 on CPU, enough for :data:`MIN_CUDA_RUN_S` on CUDA."""
    if not device.startswith("cuda"):
        return 1
    return max(1, math.ceil(MIN_CUDA_RUN_S / timed_run(fn, 1, device)))


def timed_run(fn: Callable[[], object], repeats: int, device: str) -> float:
    """Seconds per call of ``fn`` over ``repeats`` calls in a row, queued GPU work included."""
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / repeats


def interleaved_times(
    fns: dict[str, Callable[[], object]], runs: int, device: str = "cpu", warmup: int = 1
) -> dict[str, list[float]]:
    """Seconds per call of each of ``fns`` in each of ``runs`` rounds that time one run of each in turn
    (so background load hits them alike), after ``warmup`` untimed calls of each; a run holds as many
    calls as :func:`repeats_per_run` asks (one on CPU). Round ``r`` starts at the ``r``-th function and
    goes round (a, b, c; b, c, a; …): what a call inherits from the one before it (the allocator's
    free memory, the caches) falls on each function alike, not always on the same one."""
    repeats = {}
    for name, fn in fns.items():
        for _ in range(warmup):
            fn()
        repeats[name] = repeats_per_run(fn, device)
    names = list(fns)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for r in range(runs):
        start = r % len(names) if names else 0
        for name in names[start:] + names[:start]:
            seconds[name].append(timed_run(fns[name], repeats[name], device))
    return seconds


def interleaved_medians(
    fns: dict[str, Callable[[], object]], runs: int, device: str = "cpu", warmup: int = 1
) -> dict[str, float]:
    """The median of each function's :func:`interleaved_times`."""
    return {name: statistics.median(t) for name, t in interleaved_times(fns, runs, device, warmup).items()}


def per_round_speedups(ours: BenchResult, peer: BenchResult) -> list[float]:
    """``ours`` over ``peer`` in each round of interleaved runs: a drift of the machine's speed slows
    both sides of one round alike, so these spread less than ratios of separate measurements."""
    return [a / b for a, b in zip(ours.img_per_s_runs, peer.img_per_s_runs, strict=True)]
