"""Throughput, peak memory and achieved GFLOP/s of a CvT and its peers, measured the same way.

One *subject* is a model to time: ``cvt`` (this package), ``hf`` (transformers'
``CvtForImageClassification`` built from the same configuration and loaded with the same weights) or
``official`` (``benchmarks/official_reference.py``: the official algorithm re-implemented, checked to
give this package's logits). All subjects of one call run in the same process with the same input,
and their timed runs are interleaved (one run of each in turn), so background load on a shared
machine hits all of them alike.

- ``infer``: a forward pass under ``torch.inference_mode`` in eval mode;
- ``train``: forward, cross-entropy, backward and an SGD (momentum 0.9) step in train mode.
- ``bf16``/``fp16``: the fp32 model under ``torch.autocast`` (the usual mixed-precision recipe).
- GFLOP/s: 2 x the multiply-accumulates of ``cvt.complexity`` per image (x3 for a training step:
  backward costs two forwards), divided by the median time; the ceiling is a square matrix product
  in the same dtype on the same device and threads (not measured for bf16 on a CPU without bf16
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
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import importlib.util
import json
import math
import mmap
import os
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cvt.allocator import return_freed_memory
from cvt.engine.distributed import resolve_device
from cvt.errors import CheckpointError, CvtError, UsageError, first_line, is_out_of_memory
from cvt.precision import DTYPES, autocast

SUBJECTS: tuple[str, ...] = ("cvt", "hf", "official")
COMPILE_MODES: tuple[str, ...] = ("default", "reduce-overhead", "max-autotune")
# On CUDA one step of a small batch takes milliseconds (a matrix product of the ceiling, microseconds):
# a timed run repeats it until it lasts about this long, so timer resolution and launch jitter do not
# decide the result.
MIN_CUDA_RUN_S = 0.25
OFFICIAL_REFERENCE = Path(__file__).resolve().parents[2] / "benchmarks" / "official_reference.py"
# where CPU peak memory is read (Linux): statm (RSS), status (VmHWM, the peak), clear_refs (its reset)
PROC_SELF = Path("/proc/self")


@dataclass(frozen=True)
class BenchConfig:
    """What to measure; every subject of a comparison runs with the same configuration."""

    model: str = "cvt_13"
    img_size: tuple[int, int] | None = None  # None: the model's own (see measured_size)
    batch_size: int = 8
    mode: str = "infer"  # infer | train
    dtype: str = "fp32"  # fp32 | bf16 | fp16 (autocast)
    compile: bool = False  # torch.compile the subject
    compile_mode: str = "default"  # default | reduce-overhead (CUDA graphs) | max-autotune
    channels_last: bool = False  # input (and conv weights) in channels-last memory format
    grad_checkpointing: bool = False  # this package only; peers run without
    warmup: int = 2
    runs: int = 5
    device: str = "cpu"
    measure_memory: bool = True

    @property
    def measured_size(self) -> tuple[int, int]:
        """``(height, width)`` of the measured images: ``img_size``, or where it is None the size the
        model was made for (:func:`model_input_size`, e.g. 32x32 for ``cvt_tiny``)."""
        return self.img_size or model_input_size(self.model)

    def check(self) -> None:
        """Raise :class:`UsageError` for a configuration that cannot run here."""
        # a device name as every command reads it (a malformed one, or cuda without a GPU, is refused);
        # `auto` is for the caller to resolve: the measurements name a concrete device
        if self.device == "auto":
            raise UsageError(
                "BenchConfig.device must name a device: resolve 'auto' with resolve_device first"
            )
        if resolve_device(self.device).type not in ("cpu", "cuda"):  # mps, xpu …: as resolve_device words it
            raise UsageError(f"option 'device' must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.mode not in ("infer", "train"):
            raise UsageError(f"mode must be 'infer' or 'train', got {self.mode!r}")
        if self.dtype not in DTYPES:
            raise UsageError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.dtype == "fp16" and not self.device.startswith("cuda"):
            raise UsageError("dtype fp16 needs a CUDA device; on CPU use --dtype bf16 or fp32")
        if self.compile_mode not in COMPILE_MODES:
            raise UsageError(f"compile mode must be one of {COMPILE_MODES}, got {self.compile_mode!r}")
        if self.batch_size < 1 or self.runs < 1 or self.warmup < 0:
            raise UsageError(
                f"batch size and runs must be >= 1 and warmup >= 0, got batch {self.batch_size}, "
                f"runs {self.runs}, warmup {self.warmup}"
            )
        if self.measure_memory and resolve_device(self.device).type == "cpu" and not PROC_SELF.is_dir():
            raise UsageError(
                f"peak memory on CPU is read from Linux's {PROC_SELF}, which this system lacks; "
                "pass --no-memory (measure_memory=False)"
            )


@dataclass
class BenchResult:
    """The measurements of one subject."""

    subject: str
    img_per_s: float  # median
    img_per_s_min: float
    img_per_s_max: float
    img_per_s_runs: list[float]  # every timed run in order; run i of each subject shares one round
    spread_pct: float  # (max - min) / median, in percent
    step_ms: float  # median time of one batch
    peak_memory_mb: float | None
    gflops_per_s: float
    ceiling_gflops_per_s: float | None  # None: not measured, see ceiling_not_measured
    ceiling_fraction: float | None
    ceiling_not_measured: str | None = None  # why the ceiling was skipped

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return dataclasses.asdict(self)


@functools.cache
def model_input_size(model: str) -> tuple[int, int]:
    """The input size the variant or ``arch.tag`` name ``model`` was made for; :class:`UsageError` (with
    :func:`~cvt.models.create_model`'s hint) for an unknown name."""
    from cvt.models import create_model

    with torch.device("meta"):  # shapes only: no weights are made
        height, width = create_model(model).img_size
    return height, width


def synchronize(device: str) -> None:
    """Wait for queued GPU work, so wall-clock times cover it."""
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def has_bf16_kernels(device: str) -> bool:
    """Whether bf16 runs on compiled kernels (not emulated in reference code) on ``device``."""
    if device.startswith("cuda"):
        return torch.cuda.is_bf16_supported()
    from cvt.models import cpu_kernels

    return cpu_kernels.CPU_HAS_BF16_KERNELS  # read at call time: op_census and tests override it


def logical_cpus() -> int:
    """The logical CPUs this process may run on (taskset, cgroups) where the OS says, else all of them."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def machine_info(device: str, subjects: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """What a measurement on ``device`` depends on, to be reported with it: the CPU's model name, the
    logical CPUs this process may use and torch's threads, the Python and torch versions, torch's CPU
    capability (the vector instructions ATen's kernels use), whether bf16 has compiled kernels there,
    the GPU's name on CUDA, and the version of transformers where ``subjects`` include ``hf`` (its port
    is the comparison)."""
    import platform
    from importlib import metadata

    from cvt.models import cpu_kernels

    info: dict[str, Any] = {
        "cpu": cpu_kernels.cpuinfo_field("model name") or platform.processor() or platform.machine(),
        "logical_cpus": logical_cpus(),
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "bf16_kernels": has_bf16_kernels(device),
    }
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(device)
    if "hf" in subjects:
        try:
            info["transformers"] = metadata.version("transformers")
        except metadata.PackageNotFoundError:  # importable without package metadata (a source tree)
            info["transformers"] = getattr(sys.modules.get("transformers"), "__version__", "unknown")
    return info


def describe_machine(info: dict[str, Any]) -> str:
    """:func:`machine_info` on one line: ``AMD EPYC (2 logical CPUs, torch threads 2), Python 3.11.7, …``."""
    words = [
        f"{info['cpu']} ({info['logical_cpus']} logical CPUs, torch threads {info['threads']})",
        f"Python {info['python']}",
        f"torch {info['torch']}",
        f"CPU capability {info['cpu_capability']}",
        f"bf16 kernels {'yes' if info['bf16_kernels'] else 'no'}",
    ]
    if "gpu" in info:
        words.insert(1, info["gpu"])
    if "transformers" in info:
        words.append(f"transformers {info['transformers']}")
    return ", ".join(words)


def load_official_reference() -> Any:
    """The ``benchmarks/official_reference.py`` module of a source checkout."""
    if not OFFICIAL_REFERENCE.is_file():
        raise UsageError(
            "--compare official runs the official algorithm kept in the repository's "
            "benchmarks/official_reference.py, which an installed package does not ship: run cvt bench "
            "from a source checkout (git clone, then pip install -e .)"
        )
    spec = importlib.util.spec_from_file_location("cvt_official_reference", OFFICIAL_REFERENCE)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def build_hf_peer(model: nn.Module) -> nn.Module:
    """transformers' ``CvtForImageClassification`` with ``model``'s configuration and weights.

    transformers always runs GELU, so its logits differ slightly from a QuickGELU model's.
    """
    try:
        from transformers import CvtConfig, CvtForImageClassification
    except ImportError:
        raise UsageError(
            "--compare hf needs the transformers package, which is not installed (pip install 'cvt[hf]')"
        ) from None
    from cvt.checkpoint.hf import hf_config_from_model, native_to_hf

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the GELU-vs-QuickGELU warning: known, stated above
        try:
            config = hf_config_from_model(model)
        except CheckpointError as err:  # worded for export; here no file is written
            reason = str(err).removeprefix("cannot export to the Hugging Face layout: ")
            raise UsageError(f"--compare hf: transformers' CvT cannot express this model: {reason}") from None
    try:
        peer = CvtForImageClassification(CvtConfig(**config))
    except ImportError as err:  # a backend transformers needs is missing or too old (5.x: torch >= 2.6)
        raise UsageError(
            f"--compare hf: transformers cannot build its CvT model here: {first_line(err)} "
            "(transformers 5 needs torch >= 2.6; with an older torch: pip install 'transformers<5')"
        ) from None
    peer.load_state_dict(native_to_hf(model.state_dict()))
    return peer


class _Logits(nn.Module):
    """Wraps a transformers model so that calling it returns the logits tensor."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(pixel_values=x).logits


def build_subjects(cfg: BenchConfig, names: list[str]) -> tuple[dict[str, nn.Module], int]:
    """The models to time, in eval mode on ``cfg.device``, all holding the same weights, and their
    number of classes."""
    from cvt.models import create_model

    torch.manual_seed(0)
    ours = create_model(cfg.model).to(cfg.device).eval()
    if cfg.grad_checkpointing:
        ours.set_grad_checkpointing(True)
    subjects: dict[str, nn.Module] = {}
    for name in names:
        if name == "cvt":
            subjects[name] = ours
        elif name == "hf":
            subjects[name] = _Logits(build_hf_peer(ours)).to(cfg.device).eval()
        elif name == "official":
            peer = load_official_reference().OfficialCvT.from_cvt(ours).eval()
            check_same_logits(ours, peer, cfg)
            subjects[name] = peer
        else:
            raise UsageError(f"unknown benchmark subject {name!r}; expected one of {SUBJECTS}")
    if cfg.channels_last:
        for model in subjects.values():
            model.to(memory_format=torch.channels_last)
    return subjects, ours.num_classes


def check_same_logits(ours: nn.Module, peer: nn.Module, cfg: BenchConfig, atol: float = 1e-4) -> None:
    """Assert that the official re-implementation computes this package's function (fp32, eval).

    cuDNN's TF32 convolutions (PyTorch's default on Ampere and later) are switched off for the check:
    they round inputs to 10 mantissa bits, which alone moves the logits by more than ``atol``.
    """
    x = torch.randn(2, 3, *cfg.measured_size, device=cfg.device, generator=None)
    with torch.inference_mode(), torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        diff = (ours(x) - peer(x)).abs().max().item()
    if diff > atol:
        raise AssertionError(f"official re-implementation differs from cvt by {diff:.2e} (> {atol})")


def ceiling_skip_reason(dtype: str, device: str) -> str | None:
    """Why :func:`matmul_ceiling` is not worth measuring for ``dtype`` on ``device``, or None."""
    if dtype == "bf16" and not has_bf16_kernels(device):
        return f"bf16 matrix products are emulated on {device} (no bf16 kernels): they would take minutes"
    return None


def matmul_ceiling(dtype: str, device: str, size: int = 2048, runs: int = 5) -> float:
    """GFLOP/s of a ``size`` x ``size`` matrix product in ``dtype`` (median of ``runs`` timed runs,
    each of as many products as :func:`repeats_per_run` asks, after one untimed product)."""
    a = torch.randn(size, size, device=device, dtype=DTYPES[dtype])
    b = torch.randn(size, size, device=device, dtype=DTYPES[dtype])

    def product() -> None:
        a @ b

    product()  # warm-up: library initialisation and kernel selection
    repeats = repeats_per_run(product, device)
    times = [timed_run(product, repeats, device) for _ in range(runs)]
    return 2 * size**3 / statistics.median(times) / 1e9


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


def _oom_error(cfg: BenchConfig, err: BaseException) -> CvtError:
    height, width = cfg.measured_size
    return CvtError(
        f"batch size {cfg.batch_size} at {height}x{width} ({cfg.mode}, {cfg.dtype}) does "
        f"not fit in memory on {cfg.device} ({first_line(err)}); try a smaller --batch-size"
    )


def time_subjects(
    cfg: BenchConfig, subjects: dict[str, nn.Module], num_classes: int
) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Seconds per step of each subject (warm-up, then ``cfg.runs`` interleaved timed runs) and, on
    CUDA, each subject's peak MB over one more step (see the module docstring).

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
            raise _oom_error(cfg, err) from err
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
    calls as :func:`repeats_per_run` asks (one on CPU)."""
    repeats = {}
    for name, fn in fns.items():
        for _ in range(warmup):
            fn()
        repeats[name] = repeats_per_run(fn, device)
    seconds: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            seconds[name].append(timed_run(fn, repeats[name], device))
    return seconds


def interleaved_medians(
    fns: dict[str, Callable[[], object]], runs: int, device: str = "cpu", warmup: int = 1
) -> dict[str, float]:
    """The median of each function's :func:`interleaved_times`."""
    return {name: statistics.median(t) for name, t in interleaved_times(fns, runs, device, warmup).items()}


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
    """Peak memory of ``cfg``'s step for one subject, in MB (see the module docstring for what it
    holds), measured in a subprocess with this process's torch thread count."""
    if cfg.device.startswith("cuda"):
        raise ValueError("on CUDA the peak comes from the timed runs")
    request = json.dumps(
        {"cfg": dataclasses.asdict(cfg), "subject": subject, "threads": torch.get_num_threads()}
    )
    proc = subprocess.run(
        [sys.executable, "-c", "import sys, cvt.benchmark as b; b._memory_worker(sys.argv[1])", request],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        if "can't allocate memory" in proc.stderr or "MemoryError" in proc.stderr or proc.returncode < 0:
            raise _oom_error(cfg, RuntimeError(proc.stderr.strip().splitlines()[-1] if proc.stderr else ""))
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


def per_round_speedups(ours: BenchResult, peer: BenchResult) -> list[float]:
    """``ours`` over ``peer`` in each round of interleaved runs: a drift of the machine's speed slows
    both sides of one round alike, so these spread less than ratios of separate measurements."""
    return [a / b for a, b in zip(ours.img_per_s_runs, peer.img_per_s_runs, strict=True)]


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
        median = statistics.median(rates)
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
