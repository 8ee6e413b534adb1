"""What a benchmark measures and what it reports: :class:`BenchConfig` (checked before anything is
built), :class:`BenchResult`, the input size a model was made for, and the error of a batch that does not
fit in memory."""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any

import torch

from cvt.devices import resolve_device
from cvt.errors import CvtError, UsageError, first_line
from cvt.precision import DTYPES

COMPILE_MODES: tuple[str, ...] = ("default", "reduce-overhead", "max-autotune")


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
        if self.compile_mode != "default" and not self.compile:  # it would be recorded but never used
            raise UsageError(f"compile mode {self.compile_mode!r} needs compile (--compile)")
        if self.batch_size < 1 or self.runs < 1 or self.warmup < 0:
            raise UsageError(
                f"batch size and runs must be >= 1 and warmup >= 0, got batch {self.batch_size}, "
                f"runs {self.runs}, warmup {self.warmup}"
            )
        from cvt.benchmark.memory import PROC_SELF  # here, not at the top: memory imports this module

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


def out_of_memory_error(cfg: BenchConfig, err: BaseException) -> CvtError:
    """The one-line error for ``cfg``'s batch not fitting in memory (in the timed runs, or in the CPU
    memory measurement's subprocess), with ``err``'s first line as the cause."""
    height, width = cfg.measured_size
    return CvtError(
        f"batch size {cfg.batch_size} at {height}x{width} ({cfg.mode}, {cfg.dtype}) does "
        f"not fit in memory on {cfg.device} ({first_line(err)}); try a smaller --batch-size"
    )
