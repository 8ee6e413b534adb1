"""``cvt.benchmark`` measurements without a GPU: CUDA memory accounting and timing loops on fake CUDA
calls, the CPU memory worker's order of events, the bf16 ceiling skip, and op_census' attribution."""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib.util
import json
import math
import mmap
import os
import re
import subprocess
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest
import torch
from torch import nn

import cvt
from cvt import allocator, benchmark
from cvt.benchmark import BenchConfig
from cvt.complexity import count_gmacs
from cvt.errors import CvtError, UsageError, run_script
from cvt.models import CvTStage, cpu_kernels, create_model

MB = 2**20
REPO = Path(__file__).resolve().parents[1]


class FakeCudaMemory:
    """The caching allocator's counters as ``torch.cuda`` reports them: bytes allocated now and the
    peak since the last reset."""

    def __init__(self, allocated: int) -> None:
        self.allocated = allocated
        self.peak = allocated

    def reset_peak(self, device: str) -> None:
        self.peak = self.allocated

    def step(self, extra: int) -> None:
        """A step that allocates ``extra`` bytes at its peak and frees them before it returns."""
        self.peak = max(self.peak, self.allocated + extra)


def test_cuda_peak_is_each_step_above_what_was_allocated_before_it(monkeypatch: pytest.MonkeyPatch) -> None:
    # other subjects' weights and optimizer state, the input batch: all allocated before any step
    memory = FakeCudaMemory(allocated=900 * MB)
    extra = {"cvt": 40 * MB, "official": 70 * MB}
    subjects = {name: nn.Identity() for name in extra}
    made: dict[str, int] = {name: 0 for name in extra}

    def make_step(model: nn.Module, cfg: BenchConfig) -> Callable[[torch.Tensor, torch.Tensor], None]:
        name = next(n for n, m in subjects.items() if m is model)
        made[name] += 1
        return lambda x, target: memory.step(extra[name])

    monkeypatch.setattr(benchmark.timing, "make_step", make_step)
    monkeypatch.setattr(
        benchmark.timing, "make_batch", lambda cfg, num_classes: (torch.zeros(1), torch.zeros(1))
    )
    monkeypatch.setattr(benchmark.timing, "synchronize", lambda device: None)
    monkeypatch.setattr(benchmark.timing, "MIN_CUDA_RUN_S", 1e-9)  # one step per timed run
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", memory.reset_peak)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: memory.allocated)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: memory.peak)
    cfg = BenchConfig(model="cvt_tiny", device="cuda", mode="train", runs=2, warmup=1)
    times, peaks = benchmark.timing.time_subjects(cfg, subjects, num_classes=10)
    assert peaks == {"cvt": 40, "official": 70}
    assert {name: len(t) for name, t in times.items()} == {"cvt": 2, "official": 2}
    # the measured step has an optimizer of its own: its momentum buffers count, as on CPU
    assert made == {"cvt": 2, "official": 2}


def test_cuda_matmul_ceiling_repeats_the_product_for_each_timed_run(monkeypatch: pytest.MonkeyPatch) -> None:
    product_s = 30e-6  # one 2048^3 product on a big GPU: launch and sync would dominate it
    clock = {"now": 0.0, "products": 0}

    class FakeMatrix:
        def __matmul__(self, other: FakeMatrix) -> None:
            clock["now"] += product_s
            clock["products"] += 1

    monkeypatch.setattr(torch, "randn", lambda *args, **kwargs: FakeMatrix())
    monkeypatch.setattr(time, "perf_counter", lambda: clock["now"])
    monkeypatch.setattr(benchmark.timing, "synchronize", lambda device: None)
    runs = 5
    gflops = benchmark.machine.matmul_ceiling("fp32", "cuda", sizes=(2048,), runs=runs)
    assert gflops == pytest.approx(2 * 2048**3 / product_s / 1e9)
    # every timed run lasts at least MIN_CUDA_RUN_S (plus the warm-up and the probe products)
    assert clock["products"] >= runs * math.ceil(benchmark.timing.MIN_CUDA_RUN_S / product_s)


def test_cpu_matmul_ceiling_is_the_fastest_run_of_the_fastest_size(monkeypatch: pytest.MonkeyPatch) -> None:
    """An upper bound: a median of one size fell below the model's own rate on a noisy VM."""
    assert benchmark.timing.repeats_per_run(lambda: None, "cpu") == 1
    assert benchmark.machine.matmul_ceiling("fp32", "cpu", sizes=(64,), runs=2) > 0
    # size 64: fastest 0.1 s, 5.2 GFLOP/s; size 128: fastest 0.5 s, 8.4 GFLOP/s, the ceiling
    times = iter([0.3, 0.1, 0.2, 0.9, 0.5, 0.6])
    calls = []
    monkeypatch.setattr(
        benchmark.machine, "timed_run", lambda fn, repeats, device: calls.append(repeats) or next(times)
    )
    assert benchmark.machine.matmul_ceiling("fp32", "cpu", sizes=(64, 128), runs=3) == pytest.approx(
        2 * 128**3 / 0.5 / 1e9
    )
    assert calls == [1] * 6


@pytest.mark.parametrize(
    ("dtype", "kernels", "skipped"),
    [("bf16", False, True), ("bf16", True, False), ("fp32", False, False)],
)
def test_ceiling_is_skipped_for_emulated_bf16_only(
    monkeypatch: pytest.MonkeyPatch, dtype: str, kernels: bool, skipped: bool
) -> None:
    monkeypatch.setattr(cpu_kernels, "CPU_HAS_BF16_KERNELS", kernels)
    reason = benchmark.ceiling_skip_reason(dtype, "cpu")
    assert (reason is not None) == skipped
    if skipped:
        assert "emulated" in reason


class WorkerLog:
    """Records what the CPU memory worker does, in order."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.events: list[str] = []
        self.threads: list[int] = []
        real_make_step = benchmark.timing.make_step

        def make_step(model: nn.Module, cfg: BenchConfig) -> Callable[[torch.Tensor, torch.Tensor], None]:
            step = real_make_step(model, cfg)
            name = f"step{len([e for e in self.events if e.startswith('make')])}"
            self.events.append(f"make {name}")

            def logged(x: torch.Tensor, target: torch.Tensor) -> None:
                self.events.append(name)
                step(x, target)

            return logged

        def compile_(model: nn.Module, mode: str) -> nn.Module:
            self.events.append("compile")
            return model  # compiling for real takes half a minute; the order of events is the point

        def baseline() -> float:
            self.events.append("baseline")
            return 100.0

        monkeypatch.setattr(benchmark.memory, "make_step", make_step)
        monkeypatch.setattr(torch, "compile", compile_)
        monkeypatch.setattr(benchmark.memory, "settled_rss_mb", baseline)
        monkeypatch.setattr(benchmark.memory, "peak_rss_mb", lambda: 112.5)
        monkeypatch.setattr(torch, "set_num_threads", self.threads.append)


@pytest.mark.parametrize("compile_", [False, True])
def test_memory_worker_takes_its_baseline_after_a_first_step_and_settling(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], compile_: bool
) -> None:
    log = WorkerLog(monkeypatch)
    # no img_size: the worker reads the request's None as the model's own size, as the parent does
    cfg = BenchConfig(model="cvt_tiny", batch_size=2, mode="train", compile=compile_)
    benchmark.memory._memory_worker(
        json.dumps({"cfg": dataclasses.asdict(cfg), "subject": "cvt", "threads": 3})
    )
    assert float(capsys.readouterr().out) == pytest.approx(12.5)  # peak RSS minus the baseline
    assert log.threads == [3]
    # one step with an optimizer of its own before the baseline, eager or compiled (first-call
    # allocations and the compilation are not the measured step's)
    expected = ["make step0", "step0", "make step1", "baseline", "step1", "step1"]
    assert log.events == (["compile"] if compile_ else []) + expected


def test_peak_memory_subprocess_gets_this_process_thread_count(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[list[str]] = []

    def run(args: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        calls.append(args)
        return subprocess.CompletedProcess(args, 0, stdout="42.0\n", stderr="")

    monkeypatch.setattr(subprocess, "run", run)
    cfg = BenchConfig(model="cvt_tiny", img_size=(32, 32))
    assert benchmark.peak_step_memory_mb(cfg, "official") == 42.0
    request = json.loads(calls[0][-1])
    assert request["subject"] == "official" and request["threads"] == torch.get_num_threads()


def test_settled_baseline_collects_and_trims_where_libc_can(monkeypatch: pytest.MonkeyPatch) -> None:
    trims: list[int] = []
    collects: list[bool] = []

    class Glibc:
        def malloc_trim(self, pad: int) -> int:
            trims.append(pad)
            return 1

    monkeypatch.setattr(gc, "collect", lambda: collects.append(True) or 0)
    monkeypatch.setattr(allocator, "glibc", Glibc)
    assert benchmark.settled_rss_mb() > 0
    assert collects and trims == [0]
    monkeypatch.setattr(allocator, "glibc", lambda: None)  # another C library: nothing to trim
    assert benchmark.settled_rss_mb() > 0


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="Linux /proc only")
def test_settled_baseline_restarts_the_peak_rss() -> None:
    big = torch.ones(64 * MB // 4)  # touched: 64 MB resident, so the peak RSS is at least that high
    del big
    baseline = benchmark.settled_rss_mb()
    assert benchmark.peak_rss_mb() - baseline < 32


def test_peers_alone_are_measured_with_the_whole_network_flops(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(benchmark, "matmul_ceiling", lambda dtype, device: 100.0)
    cfg = BenchConfig(
        model="cvt_tiny", img_size=(32, 32), batch_size=2, runs=1, warmup=0, measure_memory=False
    )
    (official,) = benchmark.run_benchmark(cfg, ["official"], include_cvt=False)
    assert official.subject == "official"
    gmacs = count_gmacs(create_model("cvt_tiny"), (32, 32))
    assert official.gflops_per_s == pytest.approx(2 * gmacs * official.img_per_s, rel=1e-6)


def test_op_census_attributes_ops_to_the_package_only(monkeypatch: pytest.MonkeyPatch) -> None:
    census = load_benchmark_script(monkeypatch, "op_census")
    package = Path(cvt.__file__).parent
    assert census.in_package(str(package / "models" / "layers.py"))
    # a checkout folder named cvt holds the script and the virtual environment: neither is the package
    assert not census.in_package("/home/u/cvt/benchmarks/op_census.py")
    assert not census.in_package("/home/u/cvt/.venv/lib/python3.11/site-packages/torch/nn/functional.py")
    counter = census.OpCensus(set())
    model = create_model("cvt_tiny").eval()
    with torch.no_grad(), counter:
        model(torch.randn(1, 3, 32, 32))
    files = {file for file, *_ in counter.counts}
    assert files - {"-"} and files - {"-"} <= {p.name for p in package.rglob("*.py")}


@pytest.mark.parametrize(("mode", "flop_factor"), [("infer", 1), ("train", 3)])
def test_result_arithmetic_from_the_raw_step_times(
    monkeypatch: pytest.MonkeyPatch, mode: str, flop_factor: int
) -> None:
    # skewed step times: the median (0.2 s) differs from the mean, the fastest and the slowest run
    times = [0.1, 0.5, 0.2, 0.25, 0.2]
    monkeypatch.setattr(benchmark, "time_subjects", lambda cfg, subjects, num_classes: ({"cvt": times}, {}))
    monkeypatch.setattr(benchmark, "matmul_ceiling", lambda dtype, device: 50.0)
    cfg = BenchConfig(
        model="cvt_tiny", img_size=(32, 32), batch_size=4, mode=mode, runs=5, warmup=0, measure_memory=False
    )
    (result,) = benchmark.run_benchmark(cfg)
    assert result.img_per_s_runs == pytest.approx([40.0, 8.0, 20.0, 16.0, 20.0])
    assert result.img_per_s == pytest.approx(20.0)  # batch_size / median step time
    assert (result.img_per_s_min, result.img_per_s_max) == pytest.approx((8.0, 40.0))
    assert result.step_ms == pytest.approx(200.0)  # the median step, not the mean (250 ms)
    assert result.spread_pct == pytest.approx(100 * (40 - 8) / 20)  # relative to the median
    gmacs = count_gmacs(create_model("cvt_tiny"), (32, 32))
    assert result.gflops_per_s == pytest.approx(flop_factor * 2 * gmacs * 20.0, rel=1e-6)
    assert result.ceiling_gflops_per_s == 50.0
    assert result.ceiling_fraction == pytest.approx(result.gflops_per_s / 50.0, rel=1e-9)
    assert result.peak_memory_mb is None and result.ceiling_not_measured is None


class _Shifted(nn.Module):
    """A peer whose logits are ``inner``'s plus ``shift``."""

    def __init__(self, inner: nn.Module, shift: float) -> None:
        super().__init__()
        self.inner, self.shift = inner, shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x) + self.shift


def test_official_peer_must_give_cvts_logits_within_atol() -> None:
    """``check_same_logits`` refuses a peer that computes another function (here off by 1e-3, ten times
    the 1e-4 tolerance) and names the difference; a peer within the tolerance passes."""
    from cvt.benchmark.subjects import check_same_logits

    torch.manual_seed(0)
    ours = create_model("cvt_tiny").eval()
    cfg = BenchConfig(model="cvt_tiny")
    with pytest.raises(AssertionError, match=r"differs from cvt by 1\.00e-03 \(> 0\.0001\)"):
        check_same_logits(ours, _Shifted(ours, 1e-3), cfg)
    check_same_logits(ours, _Shifted(ours, 5e-5), cfg)
    check_same_logits(ours, ours, cfg)


def test_config_measures_the_models_own_size_unless_given() -> None:
    assert BenchConfig(model="cvt_tiny").measured_size == (32, 32)
    assert BenchConfig(model="cvt_13.msft_in1k_384").measured_size == (384, 384)  # a tag: its own size
    assert BenchConfig(model="cvt_tiny", img_size=(40, 48)).measured_size == (40, 48)
    x, _ = benchmark.make_batch(BenchConfig(model="cvt_tiny", batch_size=2), num_classes=10)
    assert x.shape == (2, 3, 32, 32)


def load_benchmark_script(monkeypatch: pytest.MonkeyPatch, name: str) -> ModuleType:
    """A script of benchmarks/ as a module, with its folder on sys.path as when it is run."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    monkeypatch.setitem(sys.modules, name, module)  # its dataclasses look their module up there
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def test_run_targets_speed_rows_are_cvt_over_the_faster_peer(monkeypatch, fake_result) -> None:
    run_targets = load_benchmark_script(monkeypatch, "run_targets")
    results = [fake_result("cvt", [130.0, 130.0]), fake_result("hf", [100.0, 100.0]),
               fake_result("official", [80.0, 80.0])]  # fmt: skip
    row = run_targets.speed_row("x", results, 1.25)
    assert (row.versus, row.met) == ("hf", True) and row.ratio == pytest.approx(1.3)
    assert row.paired_ratios == pytest.approx([1.3, 1.3])
    exactly = [fake_result("cvt", [125.0]), fake_result("hf", [100.0]), fake_result("official", [50.0])]
    assert run_targets.speed_row("x", exactly, 1.25).met  # the target is a minimum, met when reached
    slower = [fake_result("cvt", [124.0]), fake_result("hf", [50.0]), fake_result("official", [100.0])]
    assert not run_targets.speed_row("x", slower, 1.25).met  # 1.24x the official algorithm


def test_run_targets_memory_and_gpu_rows_are_cvt_against_their_reference(monkeypatch, fake_result) -> None:
    run_targets = load_benchmark_script(monkeypatch, "run_targets")
    peaks = {("official", False): 400.0, ("cvt", False): 280.0, ("cvt", True): 220.0}
    monkeypatch.setattr(run_targets, "peak_step_memory_mb", lambda cfg, s: peaks[s, cfg.grad_checkpointing])
    rows = run_targets.memory_rows(argparse.Namespace(device="cpu", warmup=0, runs=1))
    assert [r.ratio for r in rows] == pytest.approx([0.7, 0.55])
    assert [r.met for r in rows] == [True, False]  # <= 0.75x; with checkpointing <= 0.5x

    def bench(cfg: BenchConfig, compare=None, include_cvt: bool = True) -> list[benchmark.BenchResult]:
        return [fake_result("cvt", [350.0])] if include_cvt else [fake_result("hf", [100.0])]

    monkeypatch.setattr(run_targets, "run_benchmark", bench)
    args = argparse.Namespace(device="cuda", warmup=0, runs=1, compile_mode="default",
                              gpu_train_batches=[16], gpu_infer_batches=[8])  # fmt: skip
    rows = run_targets.gpu_rows(args)
    assert [r.ratio for r in rows] == pytest.approx([3.5, 3.5])
    assert [r.met for r in rows] == [True, True]  # training >= 2x, inference >= 3x


@pytest.mark.parametrize(
    ("script", "args"),
    [("profile_step", ["--rows", "1"]), ("fast_path_ablation", ["--runs", "1", "--flags", "dw_fp32"])],
)
def test_step_scripts_measure_the_models_own_size(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], script: str, args: list[str]
) -> None:
    main = load_benchmark_script(monkeypatch, script).main
    common = [script, "--model", "cvt_tiny", "--batch-size", "1", *args]
    monkeypatch.setattr("sys.argv", common)
    assert main() == 0
    assert "cvt_tiny 32x32 infer fp32 batch 1" in capsys.readouterr().out
    monkeypatch.setattr("sys.argv", [*common, "--img-size", "40,48"])
    assert main() == 0
    assert "cvt_tiny 40x48 infer fp32 batch 1" in capsys.readouterr().out


def test_device_check_passes_on_the_cpu_and_fails_on_a_graph_break(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    check = load_benchmark_script(monkeypatch, "device_check")
    monkeypatch.setattr(
        "sys.argv", ["device_check", "--device", "cpu", "--model", "cvt_tiny", "--batch-size", "2"]
    )
    assert check.main() == 0
    out = capsys.readouterr().out
    assert out.count("1 graph(s), 0 break(s)") == 4
    fp32 = float(out.split("logits fp32 vs CPU reference ")[1].split(",")[0])
    assert 0 < fp32 < check.FP32_LIMIT  # the fast paths differ from the plain path by rounding only

    stage_forward = CvTStage.forward

    def forward_after_a_break(self: CvTStage, *args: object, **kwargs: object) -> object:
        torch._dynamo.graph_break()
        return stage_forward(self, *args, **kwargs)

    monkeypatch.setattr(CvTStage, "forward", forward_after_a_break)
    assert check.main() == 1
    assert "graph break(s) in eval fp32" in capsys.readouterr().err


def test_device_check_ignores_gradients_that_are_rounding_noise(monkeypatch: pytest.MonkeyPatch) -> None:
    check = load_benchmark_script(monkeypatch, "device_check")
    reference = {"w": torch.ones(100), "k_bias": torch.full((4,), 1e-9)}
    grads = {"w": torch.ones(100) * 1.001, "k_bias": torch.full((4,), -1e-9)}  # noise: 200 % off
    whole, worst, name = check.gradient_errors(grads, reference)
    assert name == "w" and worst == pytest.approx(1e-3, rel=1e-3)
    assert whole == pytest.approx(1e-3, rel=1e-2)
    grads["w"] = torch.ones(100) * 1.5
    assert check.gradient_errors(grads, reference)[1] == pytest.approx(0.5)


def test_op_times_sorts_composite_and_decomposed_ops_into_the_same_kinds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    op_times = load_benchmark_script(monkeypatch, "op_times")
    # inference_mode shows composites whole, autograd what they decompose into: same kind either way
    for names, kind in [
        (("linear", "addmm", "mm", "_linear_pointwise"), "linear layers"),
        (("einsum", "matmul", "bmm", "softmax", "_softmax", "scaled_dot_product_attention",
          "_scaled_dot_product_flash_attention_for_cpu"), "attention"),
        (("conv2d", "convolution", "convolution_backward"), "convolutions"),
        (("layer_norm", "add", "_to_copy", "gelu"), "other ops"),
    ]:  # fmt: skip
        assert {op_times.op_kind(name) for name in names} == {kind}


def test_op_timer_times_each_op_by_the_wall_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    op_times = load_benchmark_script(monkeypatch, "op_times")
    a, b = torch.randn(384, 384), torch.randn(384, 384)

    def three_steps() -> None:
        for _ in range(3):
            (a @ b).add_(1.0)

    timer = op_times.OpTimer()
    start = time.perf_counter()
    with timer:
        three_steps()
    elapsed = time.perf_counter() - start
    assert timer.calls == {("mm", "(384, 384) (384, 384)"): 3, ("add_", "(384, 384)"): 3}
    kinds = timer.by_kind()
    assert kinds["linear layers"] > 0 and kinds["other ops"] > 0
    assert sum(kinds.values()) <= elapsed  # each op is timed inside the wall-clock window

    # a clock that ticks once per reading: every op lasts exactly one tick, added up per op and kind
    ticks = iter(range(1000))
    monkeypatch.setattr(op_times.time, "perf_counter", lambda: float(next(ticks)))
    timer = op_times.OpTimer()
    with timer:
        three_steps()
    assert timer.seconds == {("mm", "(384, 384) (384, 384)"): 3.0, ("add_", "(384, 384)"): 3.0}
    assert timer.by_kind() == {"linear layers": 3.0, "attention": 0.0, "convolutions": 0.0, "other ops": 3.0}


def test_op_timer_counts_recomputed_attention_products_as_attention(monkeypatch: pytest.MonkeyPatch) -> None:
    op_times = load_benchmark_script(monkeypatch, "op_times")
    q, k, v = (torch.randn(1, 1, 96, 16, requires_grad=True) for _ in range(3))

    def forward_backward() -> None:
        cpu_kernels.RecomputedAttention.apply(q, k, v, 0.25).sum().backward()

    # outside the region its 2-D products are mm calls, which by name are linear layers
    timer = op_times.OpTimer()
    with timer:
        forward_backward()
    assert timer.by_kind()["linear layers"] > 0
    # inside, every op of its forward and backward is attention (the sum and the loss's ones are not)
    timer = op_times.OpTimer()
    with timer, op_times.attention_region(timer):
        forward_backward()
    kinds = timer.by_kind()
    assert kinds["linear layers"] == 0 and kinds["attention"] > 0
    assert {"mm [attention]", "_softmax [attention]"} <= {name for name, _ in timer.seconds}
    assert ("sum", "(1, 1, 96, 16)") in timer.seconds  # outside the kernel: by its name
    # the kernel is restored afterwards: a later timer counts its products by name again
    timer = op_times.OpTimer()
    with timer:
        forward_backward()
    assert timer.by_kind()["linear layers"] > 0


def test_op_times_floor_is_the_faster_peer_over_cvts_linear_layers(monkeypatch: pytest.MonkeyPatch) -> None:
    op_times = load_benchmark_script(monkeypatch, "op_times")
    steps = {"cvt": 0.25, "hf": 0.30, "official": 0.40}
    measured, needed = op_times.floor_lines(steps, ours_linear=0.15, target=1.4)
    assert measured == (
        "cvt over the faster peer (hf): 1.20x measured; at most 2.00x if cvt's ops other than its linear "
        "layers took no time"
    )
    # 0.30 / 1.4 = 214 ms for the step, of which 150 go to the linear layers
    assert needed == "1.4x needs cvt's step within 214 ms: its other ops within 64 ms (now 100 ms)"
    assert op_times.floor_lines({"cvt": 0.25}, ours_linear=0.15, target=None) == []


def test_op_times_tables_add_up_per_subject(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    main = load_benchmark_script(monkeypatch, "op_times").main
    args = ["--model", "cvt_tiny", "--batch-size", "2", "--runs", "1", "--subjects", "cvt,official"]
    monkeypatch.setattr("sys.argv", ["op_times", *args, "--mode", "train", "--rows", "2"])
    assert main() == 0
    out = capsys.readouterr().out
    assert "cvt_tiny 32x32 train fp32 batch 2" in out
    rows = {line.split(" | ")[0][2:]: line.strip(" |").split(" | ")[1:] for line in out.splitlines()
            if line.startswith(("| cvt |", "| official |"))}  # fmt: skip
    assert set(rows) == {"cvt", "official"}
    for step, timed, *kinds in ([float(c) for c in cells] for cells in rows.values()):
        assert step > 0 and kinds[0] > 0  # every subject runs linear layers
        assert sum(kinds) == pytest.approx(timed, abs=0.3)  # the kinds split the timed ops (rounding)
    assert "cvt over the faster peer (official)" in out
    assert out.count("slowest ops") == 2


@pytest.mark.parametrize("bf16_kernels", [False, True])
def test_onnx_serving_runs_the_export_and_both_eager_dtypes(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], bf16_kernels: bool
) -> None:
    """One row per batch size: eager fp32, eager bf16 only where oneDNN has bf16 kernels, and the ONNX
    export in onnxruntime, whose logits equal eager fp32's."""
    monkeypatch.setattr(cpu_kernels, "CPU_HAS_BF16_KERNELS", bf16_kernels)
    main = load_benchmark_script(monkeypatch, "onnx_serving").main
    args = ["--model", "cvt_tiny", "--batch-sizes", "1,3", "--runs", "1", "--threads", "2"]
    monkeypatch.setattr("sys.argv", ["onnx_serving", *args])
    assert main() == 0
    out = capsys.readouterr().out
    assert "cvt_tiny 32x32 inference, 2 threads" in out
    rows = [line.strip(" |").split(" | ") for line in out.splitlines() if line.startswith(("| 1 |", "| 3 |"))]
    assert [row[0] for row in rows] == ["1", "3"]
    for _, fp32, bf16, onnx, max_diff in rows:
        assert float(fp32) > 0 and float(onnx) > 0
        assert (float(bf16) > 0) if bf16_kernels else bf16 == "-"
        assert float(max_diff) < 1e-4


def test_attention_kernels_takes_cvt13s_shapes_at_any_size_and_times_each_kernel(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    script = load_benchmark_script(monkeypatch, "attention_kernels")
    # (heads, queries, keys): stride-2 keys, and stage 3's cls token among queries and keys
    assert script.attention_shapes(224) == {
        "stage 1": (1, 3136, 784), "stage 2": (3, 784, 196), "stage 3": (6, 197, 50)
    }  # fmt: skip
    assert script.attention_shapes(384)["stage 1"] == (1, 9216, 2304)
    argv = ["attention_kernels", "--dtypes", "fp32", "--runs", "1", "--img-size", "64"]
    monkeypatch.setattr("sys.argv", [*argv, "--batch-scale", "0.125"])
    assert script.main() == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| fp32 |")]
    stages = ["stage 1: 1 x 256 x 64", "stage 2: 3 x 64 x 16", "stage 3: 6 x 17 x 5"]  # at 64 px
    expected = [[mode, stage] for mode in ("forward, batch 1", "fwd+bwd, batch 2") for stage in stages]
    assert [row.split(" | ")[1:3] for row in rows] == expected
    for row in rows:  # SDPA, explicit and cvt's kernel each timed, and both speed-ups computed
        cells = row.strip("|").split("|")
        assert all(float(cells[i].strip().rstrip("x")) > 0 for i in (3, 4, 5, 6, 7))


def test_interleaved_medians_warm_up_then_time_one_call_of_each_in_turn(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each round starts one function further on, so no function always runs after the same one."""
    calls: list[str] = []
    fns = {name: (lambda name=name: calls.append(name)) for name in ("a", "b", "c")}
    durations = iter([0.5, 2.0, 4.0, 3.0, 5.0, 0.1, 6.0, 0.3, 1.0])  # a b c, b c a, c a b
    monkeypatch.setattr(benchmark.timing, "timed_run", lambda fn, repeats, device: (fn(), next(durations))[1])
    seconds = benchmark.timing.interleaved_medians(fns, runs=3, warmup=2)
    assert calls == ["a", "a", "b", "b", "c", "c", "a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert seconds == {"a": 0.3, "b": 2.0, "c": 5.0}  # a: 0.5 0.1 0.3, b: 2.0 3.0 1.0, c: 4.0 5.0 6.0


def test_cpuinfo_field_reads_the_first_value_of_a_field(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(
        "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 9R14: 96-Core\n\n"
        "processor\t: 1\nvendor_id\t: AuthenticAMD\nmodel name\t: another\n"
    )
    assert cpu_kernels.cpuinfo_field("model name", str(cpuinfo)) == "AMD EPYC 9R14: 96-Core"
    assert cpu_kernels.cpuinfo_field("vendor_id", str(cpuinfo)) == "AuthenticAMD"
    assert cpu_kernels.cpuinfo_field("flags", str(cpuinfo)) == ""  # a field this CPU does not list
    assert cpu_kernels.cpuinfo_field("vendor_id", str(tmp_path / "missing")) == ""  # not Linux


def test_machine_info_names_the_cpu_and_the_compared_port(monkeypatch: pytest.MonkeyPatch) -> None:
    transformers = pytest.importorskip("transformers")
    monkeypatch.setattr(cpu_kernels, "cpuinfo_field", lambda name: "Zen 9" if name == "model name" else "")
    info = benchmark.machine_info("cpu", ["hf", "official"])
    assert info["cpu"] == "Zen 9" and info["transformers"] == transformers.__version__
    assert info["cpu_capability"] == torch.backends.cpu.get_cpu_capability() and "gpu" not in info
    line = benchmark.describe_machine(info)
    assert line.startswith(f"Zen 9 ({os.cpu_count()} logical CPUs, torch threads {torch.get_num_threads()})")
    assert f"torch {torch.__version__}" in line and line.endswith(f"transformers {transformers.__version__}")
    assert "transformers" not in benchmark.describe_machine(benchmark.machine_info("cpu", ["official"]))


def test_machine_info_counts_the_cpus_this_process_may_use_and_survives_missing_metadata(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``taskset -c 0`` on a bigger machine: one CPU, not the machine's count; transformers importable
    from a source tree, without package metadata: its module's version, after the measurement."""
    from importlib import metadata

    transformers = pytest.importorskip("transformers")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)

    def no_metadata(name: str) -> str:
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "version", no_metadata)
    info = benchmark.machine_info("cpu", ["hf"])
    assert info["logical_cpus"] == 1 and info["transformers"] == transformers.__version__


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"runs": 0}, "runs must be >= 1"),
        ({"warmup": -1}, "warmup >= 0"),
        ({"mode": "eval"}, "mode must be 'infer' or 'train', got 'eval'"),
        ({"device": "auto"}, "resolve 'auto' with resolve_device first"),
    ],
)
def test_config_refuses_what_cannot_be_measured(fields: dict[str, object], message: str) -> None:
    """No timed run (nothing to take a median of), a negative warm-up, an unknown mode, or ``auto`` (the
    figures must name a concrete device): refused before anything is built."""
    cfg = BenchConfig(model="cvt_tiny", measure_memory=False, **fields)  # type: ignore[arg-type]
    with pytest.raises(UsageError, match=re.escape(message)):
        cfg.check()


def test_config_defaults_are_the_documented_ones() -> None:
    cfg = BenchConfig()
    assert (cfg.model, cfg.batch_size, cfg.mode, cfg.dtype) == ("cvt_13", 8, "infer", "fp32")
    assert (cfg.warmup, cfg.runs, cfg.device, cfg.measure_memory) == (2, 5, "cpu", True)
    assert (cfg.compile, cfg.compile_mode, cfg.channels_last, cfg.grad_checkpointing) == (
        False, "default", False, False,
    )  # fmt: skip


def test_rss_figures_are_read_from_proc_in_mb(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """statm's second field is the RSS in pages; status's VmHWM the peak in kB (MB = 2**20 bytes)."""
    (tmp_path / "statm").write_text("99999 2560 300 1 0 500 0\n")  # size, resident, shared, ...
    (tmp_path / "status").write_text(
        "Name:\tpython\nVmPeak:\t  999999 kB\nVmHWM:\t  153600 kB\nVmRSS:\t 1 kB\n"
    )
    monkeypatch.setattr(benchmark.memory, "PROC_SELF", tmp_path)
    assert benchmark.memory._rss_mb() == pytest.approx(2560 * mmap.PAGESIZE / MB)
    assert benchmark.peak_rss_mb() == pytest.approx(150.0)
    (tmp_path / "status").write_text("Name:\tpython\nVmRSS:\t 1 kB\n")  # a kernel without the peak
    with pytest.raises(RuntimeError, match="has no VmHWM line"):
        benchmark.peak_rss_mb()


@pytest.mark.parametrize(
    ("returncode", "stderr", "error", "message"),
    [
        # killed by a signal: the kernel's OOM killer
        (-9, "", CvtError, "batch size 64 at 40x48 (train, fp32) does not fit in memory on cpu"),
        (1, "RuntimeError: DefaultCPUAllocator: can't allocate memory: you tried", CvtError, "does not fit"),
        (1, "Traceback ...\nMemoryError", CvtError, "does not fit in memory"),
        (1, "Traceback ...\nKeyError: 'stages'", RuntimeError, "memory measurement of cvt failed"),
    ],
)
def test_memory_subprocess_failures_are_told_apart(
    monkeypatch: pytest.MonkeyPatch, returncode: int, stderr: str, error: type[Exception], message: str
) -> None:
    """A worker killed by a signal (the kernel's OOM killer) or failing to allocate is a batch that does not
    fit, worded as in the timed runs; any other failure is a bug, reported with its traceback."""
    monkeypatch.setattr(
        subprocess, "run", lambda args, **kwargs: subprocess.CompletedProcess(args, returncode, "", stderr)
    )
    cfg = BenchConfig(model="cvt_tiny", img_size=(40, 48), batch_size=64, mode="train")
    with pytest.raises(error, match=re.escape(message)) as caught:
        benchmark.peak_step_memory_mb(cfg, "cvt")
    assert isinstance(caught.value, CvtError) == (error is CvtError)


def test_memory_subprocess_figure_is_its_last_line(monkeypatch: pytest.MonkeyPatch) -> None:
    # a library that prints a warning to stdout before the worker prints its figure
    out = "UserWarning: something about threads\n37.25\n"
    monkeypatch.setattr(subprocess, "run", lambda args, **kw: subprocess.CompletedProcess(args, 0, out, ""))
    assert benchmark.peak_step_memory_mb(BenchConfig(model="cvt_tiny"), "cvt") == 37.25


def test_subjects_get_grad_checkpointing_and_channels_last_as_asked() -> None:
    cfg = BenchConfig(model="cvt_tiny", grad_checkpointing=True, channels_last=True)
    subjects, _ = benchmark.build_subjects(cfg, ["cvt", "official"])
    assert all(stage.grad_checkpointing for stage in subjects["cvt"].stages)
    for model in subjects.values():
        convs = [m.weight for m in model.modules() if isinstance(m, nn.Conv2d)]
        assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    x, _ = benchmark.make_batch(cfg, num_classes=10)
    assert x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    plain, _ = benchmark.build_subjects(BenchConfig(model="cvt_tiny"), ["cvt"])
    assert not any(stage.grad_checkpointing for stage in plain["cvt"].stages)


def test_official_peer_that_computes_another_function_is_refused_when_built(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    class OfficialCvT:
        @staticmethod
        def from_cvt(ours: nn.Module) -> nn.Module:
            return _Shifted(ours, 1e-2)

    monkeypatch.setattr(
        benchmark.subjects, "load_official_reference", lambda: types.SimpleNamespace(OfficialCvT=OfficialCvT)
    )
    with pytest.raises(AssertionError, match="official re-implementation differs from cvt"):
        benchmark.build_subjects(BenchConfig(model="cvt_tiny"), ["cvt", "official"])
    with pytest.raises(UsageError, match="unknown benchmark subject 'timm'"):
        benchmark.build_subjects(BenchConfig(model="cvt_tiny"), ["cvt", "timm"])


def test_hf_peer_holds_cvts_weights() -> None:
    pytest.importorskip("transformers")
    from cvt.checkpoint.hf import native_to_hf

    subjects, num_classes = benchmark.build_subjects(BenchConfig(model="cvt_13"), ["cvt", "hf"])
    assert num_classes == 1000
    expected = native_to_hf(subjects["cvt"].state_dict())
    peer = subjects["hf"].inner.state_dict()
    assert set(expected) <= set(peer)
    for name, tensor in expected.items():
        assert torch.equal(peer[name], tensor), name


class _Probe(nn.Module):
    """A linear classifier that records the state its forward runs in."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 3)
        self.seen: list[tuple[bool, bool, bool, torch.dtype | None]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        autocast_dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
        inference, grad = torch.is_inference_mode_enabled(), torch.is_grad_enabled()
        self.seen.append((self.training, inference, grad, autocast_dtype))
        return self.linear(x)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_infer_step_is_an_eval_forward_in_inference_mode_and_autocast(dtype: str) -> None:
    model = _Probe().train()
    step = benchmark.make_step(model, BenchConfig(mode="infer", dtype=dtype))
    step(torch.randn(2, 4), torch.tensor([0, 2]))
    assert model.seen == [(False, True, False, None if dtype == "fp32" else torch.bfloat16)]


def test_train_step_is_a_train_mode_sgd_step_with_momentum(monkeypatch: pytest.MonkeyPatch) -> None:
    optimizers: list[torch.optim.SGD] = []

    class RecordedSGD(torch.optim.SGD):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, **kwargs)  # type: ignore[arg-type]
            optimizers.append(self)

    monkeypatch.setattr(torch.optim, "SGD", RecordedSGD)
    model = _Probe().eval()
    before = model.linear.weight.detach().clone()
    step = benchmark.make_step(model, BenchConfig(mode="train", dtype="bf16"))
    step(torch.randn(2, 4), torch.tensor([0, 2]))
    assert model.seen == [(True, False, True, torch.bfloat16)]  # train mode, autograd, autocast
    (optimizer,) = optimizers
    assert optimizer.defaults["momentum"] == 0.9
    # the step updated the weights, created its momentum buffers and left no gradients behind
    assert not torch.equal(model.linear.weight, before)
    assert all("momentum_buffer" in optimizer.state[p] for p in model.parameters())
    assert all(p.grad is None for p in model.parameters())


def test_batch_is_the_same_each_time_with_labels_among_the_classes() -> None:
    cfg = BenchConfig(model="cvt_tiny", batch_size=64)
    x, target = benchmark.make_batch(cfg, num_classes=3)
    assert set(target.tolist()) == {0, 1, 2}
    x2, target2 = benchmark.make_batch(cfg, num_classes=3)
    assert torch.equal(x, x2) and torch.equal(target, target2)  # every subject and process: one batch


@pytest.mark.parametrize("compile_", [False, True])
def test_timed_subjects_are_compiled_in_the_asked_mode(
    monkeypatch: pytest.MonkeyPatch, compile_: bool
) -> None:
    modes: list[str] = []

    def compile_model(model: nn.Module, mode: str = "default") -> nn.Module:
        modes.append(mode)
        return model

    monkeypatch.setattr(torch, "compile", compile_model)
    cfg = BenchConfig(model="cvt_tiny", batch_size=1, warmup=0, runs=1, compile=compile_,
                      compile_mode="max-autotune")  # fmt: skip
    times, _ = benchmark.time_subjects(cfg, {"cvt": nn.Identity(), "official": nn.Identity()}, num_classes=10)
    assert modes == (["max-autotune"] * 2 if compile_ else [])
    assert {name: len(t) for name, t in times.items()} == {"cvt": 1, "official": 1}


def test_timed_steps_are_the_warm_up_then_the_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    subjects = {"cvt": nn.Identity(), "official": nn.Identity()}

    def make_step(model: nn.Module, cfg: BenchConfig) -> Callable[[torch.Tensor, torch.Tensor], None]:
        name = next(n for n, m in subjects.items() if m is model)
        return lambda x, target: calls.append(name)

    monkeypatch.setattr(benchmark.timing, "make_step", make_step)
    cfg = BenchConfig(model="cvt_tiny", batch_size=1, warmup=3, runs=2)
    times, peaks = benchmark.time_subjects(cfg, subjects, num_classes=10)
    assert calls == ["cvt"] * 3 + ["official"] * 3 + ["cvt", "official", "official", "cvt"]  # rounds rotate
    assert {name: len(t) for name, t in times.items()} == {"cvt": 2, "official": 2} and peaks == {}


def test_a_failing_step_that_is_not_out_of_memory_is_not_reported_as_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken(x: torch.Tensor, target: torch.Tensor) -> None:
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)")

    monkeypatch.setattr(benchmark.timing, "make_step", lambda model, cfg: broken)
    cfg = BenchConfig(model="cvt_tiny", batch_size=1, warmup=1, runs=1)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied") as caught:
        benchmark.time_subjects(cfg, {"cvt": nn.Identity()}, num_classes=10)
    assert not isinstance(caught.value, CvtError)


def test_cuda_peak_memory_is_skipped_without_measure_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    steps = []
    monkeypatch.setattr(benchmark.timing, "make_step", lambda model, cfg: lambda x, t: steps.append(1))
    monkeypatch.setattr(
        benchmark.timing, "make_batch", lambda cfg, num_classes: (torch.zeros(1), torch.zeros(1))
    )
    monkeypatch.setattr(benchmark.timing, "synchronize", lambda device: None)
    monkeypatch.setattr(benchmark.timing, "MIN_CUDA_RUN_S", 1e-9)  # one step per timed run
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device: pytest.fail("measured"))
    cfg = BenchConfig(model="cvt_tiny", device="cuda", runs=2, warmup=1, measure_memory=False)
    _, peaks = benchmark.time_subjects(cfg, {"cvt": nn.Identity()}, num_classes=10)
    assert peaks == {} and len(steps) == 1 + 1 + 2  # warm-up, sizing the run, the timed runs


@pytest.mark.parametrize("measure_memory", [False, True])
def test_cuda_results_take_their_peak_memory_from_the_timed_runs(
    monkeypatch: pytest.MonkeyPatch, measure_memory: bool
) -> None:
    monkeypatch.setattr(benchmark.config, "resolve_device", torch.device)  # a GPU, as far as the check goes
    monkeypatch.setattr(benchmark, "build_subjects", lambda cfg, names: (dict.fromkeys(names), 10))
    peaks = {"cvt": 123.0, "official": 456.0} if measure_memory else {}
    monkeypatch.setattr(
        benchmark, "time_subjects", lambda cfg, subjects, n: ({"cvt": [0.5], "official": [0.25]}, peaks)
    )
    monkeypatch.setattr(benchmark, "matmul_ceiling", lambda dtype, device: 100.0)
    monkeypatch.setattr(benchmark, "peak_step_memory_mb", lambda cfg, name: pytest.fail("CPU measurement"))
    cfg = BenchConfig(model="cvt_tiny", device="cuda", batch_size=2, measure_memory=measure_memory)
    results = benchmark.run_benchmark(cfg, ["official"])
    assert [r.peak_memory_mb for r in results] == ([123.0, 456.0] if measure_memory else [None, None])
    assert [r.img_per_s for r in results] == [4.0, 8.0]


def test_cuda_matmul_ceiling_sizes_its_runs_after_a_warm_up(monkeypatch: pytest.MonkeyPatch) -> None:
    """The first product pays for the library's initialisation (a second on some GPUs): sized by it, a timed
    run would hold one product of microseconds, which launch and sync would dominate."""
    clock = {"now": 0.0, "products": 0}

    class FakeMatrix:
        def __matmul__(self, other: FakeMatrix) -> None:
            clock["now"] += 1.0 if clock["products"] == 0 else 30e-6
            clock["products"] += 1

    monkeypatch.setattr(torch, "randn", lambda *args, **kwargs: FakeMatrix())
    monkeypatch.setattr(time, "perf_counter", lambda: clock["now"])
    monkeypatch.setattr(benchmark.timing, "synchronize", lambda device: None)
    assert benchmark.machine.matmul_ceiling("fp32", "cuda", sizes=(2048,), runs=3) == pytest.approx(
        2 * 2048**3 / 30e-6 / 1e9
    )
    assert clock["products"] >= 3 * math.ceil(benchmark.timing.MIN_CUDA_RUN_S / 30e-6)


def test_ceiling_is_measured_for_fp16_on_a_gpu_without_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(benchmark.machine, "has_bf16_kernels", lambda device: False)  # e.g. a V100
    assert benchmark.ceiling_skip_reason("fp16", "cuda") is None
    assert "emulated on cuda" in benchmark.ceiling_skip_reason("bf16", "cuda")


def test_machine_line_names_the_gpu_after_the_cpu_and_bf16_kernels() -> None:
    info = {"cpu": "Xeon", "logical_cpus": 16, "threads": 8, "python": "3.11.7", "torch": "2.5.1",
            "cpu_capability": "AVX512", "bf16_kernels": True, "gpu": "NVIDIA H200"}  # fmt: skip
    assert benchmark.describe_machine(info) == (
        "Xeon (16 logical CPUs, torch threads 8), NVIDIA H200, Python 3.11.7, torch 2.5.1, "
        "CPU capability AVX512, bf16 kernels yes"
    )


def test_a_script_prints_one_line_for_a_users_error_and_exits_with_its_code(capsys) -> None:
    def main() -> int:
        raise UsageError("device 'cuda' asked for, but torch sees no CUDA GPU\nmore detail")

    with pytest.raises(SystemExit) as exited:
        run_script(main, "run_targets.py")
    assert exited.value.code == 2
    assert (
        capsys.readouterr().err
        == "run_targets.py: error: device 'cuda' asked for, but torch sees no CUDA GPU\n"
    )
    with pytest.raises(SystemExit) as exited:
        run_script(lambda: 1, "run_targets.py")  # a missed target: the script's own status
    assert exited.value.code == 1


def test_every_benchmark_script_runs_its_main_through_run_script() -> None:
    """A user's error in any script (``--device cuda`` without a GPU) is one line, not a traceback."""
    for script in sorted((REPO / "benchmarks").glob("*.py")):
        text = script.read_text(encoding="utf-8")
        if "def main(" in text:
            assert text.rstrip().endswith(f'run_script(main, "{script.name}")'), script.name


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_run_targets_on_cuda_without_a_gpu_is_one_line() -> None:
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "run_targets.py"), "--device", "cuda", "--only", "gpu"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr == "run_targets.py: error: device 'cuda' asked for, but torch sees no CUDA GPU\n"
