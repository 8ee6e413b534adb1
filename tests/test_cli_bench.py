"""``cvt bench``: JSON report on a tiny model, the official peer check, accepted model names, the
ceiling skip, and one-line errors (issue 4); ``cvt info``'s class-count check."""

from __future__ import annotations

import json
import os
import sys
import types
from pathlib import Path

import pytest
import torch

from cvt import allocator, benchmark
from cvt.benchmark import BenchConfig, BenchResult, build_subjects
from cvt.cli.main import main
from cvt.complexity import count_gmacs
from cvt.devices import resolve_device
from cvt.models import cpu_kernels, create_model


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["bench", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_bench_json_on_tiny_model_against_official(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(
        capsys, "--model", "cvt_tiny", "--batch-size", "2", "--runs", "3",
        "--warmup", "0", "--compare", "official", "--no-memory", "--json",
    )  # fmt: skip
    assert code == 0
    report = json.loads(out)
    # no --img-size: the model's own input size (32 for cvt_tiny), not 224
    assert report["config"]["batch_size"] == 2 and report["config"]["img_size"] == [32, 32]
    ours, official = report["results"]
    gmacs = count_gmacs(create_model("cvt_tiny"), (32, 32))
    assert (ours["subject"], official["subject"]) == ("cvt", "official")
    for r in (ours, official):
        assert r["img_per_s"] > 0 and r["img_per_s_min"] <= r["img_per_s"] <= r["img_per_s_max"]
        runs = r["img_per_s_runs"]
        assert len(runs) == 3 and sorted(runs)[1] == r["img_per_s"]  # the median of the runs
        assert (min(runs), max(runs)) == (r["img_per_s_min"], r["img_per_s_max"])
        assert r["ceiling_gflops_per_s"] > 0
        # GFLOP/s = FLOPs per image x img/s (FLOPs = 2 x multiply-accumulates)
        assert r["gflops_per_s"] == pytest.approx(2 * gmacs * r["img_per_s"], rel=1e-6)
        assert r["peak_memory_mb"] is None
    assert report["speedup"]["official"] == pytest.approx(ours["img_per_s"] / official["img_per_s"])
    # the machine the figures belong to; no transformers version without its port among the subjects
    machine = report["machine"]
    assert machine["torch"] == torch.__version__ and machine["threads"] == torch.get_num_threads()
    assert machine["logical_cpus"] == len(os.sched_getaffinity(0)) and machine["cpu"]
    assert machine["bf16_kernels"] is cpu_kernels.CPU_HAS_BF16_KERNELS and "transformers" not in machine
    assert "cvt's forward skips the last block's unused tokens" in report["gflops_basis"]  # an effective rate
    # the same round of interleaved runs, run by run
    expected = [a / b for a, b in zip(ours["img_per_s_runs"], official["img_per_s_runs"], strict=True)]
    assert report["speedup_per_round"]["official"] == pytest.approx(expected)


def test_official_peer_has_the_same_logits_as_cvt() -> None:
    cfg = BenchConfig(model="cvt_tiny", img_size=(32, 32))
    subjects, num_classes = build_subjects(cfg, ["cvt", "official"])
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ours, official = subjects["cvt"](x), subjects["official"](x)
    assert num_classes == ours.shape[1] == 10
    torch.testing.assert_close(official, ours, rtol=0, atol=1e-5)
    assert ours.std() > 0  # the check is not on constants


@pytest.mark.slow
def test_train_step_peak_memory_is_measured_in_a_fresh_process() -> None:
    cfg = BenchConfig(model="cvt_tiny", img_size=(32, 32), batch_size=64, mode="train")
    peak = benchmark.peak_step_memory_mb(cfg, "cvt")
    # 64 images of 32x32 keep several MB of activations; far below a whole extra process (~300 MB)
    assert 1 < peak < 300


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--dtype", "fp16", "--device", "cpu"], "fp16 needs a CUDA device"),
        (["--dtype", "int8"], "dtype must be one of"),
        (["--model", "cvt_99"], "unknown model 'cvt_99'"),
        (["--model", "cvt_14"], "unknown model 'cvt_14'; did you mean cvt_21, cvt_13"),  # create_model's
        (["--batch-size", "0"], "must be >= 1"),
        (["--compile", "--compile-mode", "fastest"], "compile mode must be one of"),
        (["--compile-mode", "reduce-overhead"], "compile mode 'reduce-overhead' needs compile (--compile)"),
        (["--device", "gpu"], "must be auto, cpu, cuda or cuda:N, got 'gpu'"),  # as predict and eval say
    ],
)
def test_bad_options_give_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    code, _, err = run_cli(capsys, *args)
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("threads", ["3", "64"])  # (not 100000: a regression would kill the test process)
def test_more_threads_than_usable_cpus_give_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, threads: str
) -> None:
    """100000 threads was a segfault, 20000 a raw libgomp line, 50000 an out-of-memory advice."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)  # taskset -c 0,1
    before = torch.get_num_threads()
    code, out, err = run_cli(capsys, "--model", "cvt_tiny", "--threads", threads)
    assert code == 2 and not out
    assert err == (
        "cvt bench: error: --threads must be at most the 2 logical CPU(s) this process may use, "
        f"got {threads}\n"
    )
    assert torch.get_num_threads() == before  # refused before any thread was made


def test_the_speedup_cell_is_ours_over_the_peer_with_its_per_round_range(fake_result) -> None:
    from cvt.cli.bench import _speedup_cell

    ours, peer = fake_result("cvt", [30.0, 30.0]), fake_result("hf", [20.0, 15.0])
    assert _speedup_cell(ours, peer) == "1.50x (1.50-2.00)"  # medians 30 / 20; rounds 30/20 and 30/15


def test_compare_hf_without_transformers(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)  # import fails
    code, _, err = run_cli(capsys, "--model", "cvt_13", "--compare", "hf", "--runs", "1", "--no-memory")
    assert code == 2
    assert "needs the transformers package" in err and len(err.strip().splitlines()) == 1


def test_compare_hf_with_a_transformers_too_new_for_this_torch(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """transformers 5 imports under torch 2.5 but refuses to build a model: one line, not its traceback."""
    cvt_config = pytest.importorskip("transformers").CvtConfig

    def refused(config: object) -> None:  # what transformers 5.24 raises under torch 2.5.1
        raise ImportError(
            "\nCvtForImageClassification requires PyTorch >= 2.6, but PyTorch was not found or an older "
            "version is installed.\nPlease install or upgrade PyTorch by following the instructions ..."
        )

    too_new = types.ModuleType("transformers")
    too_new.CvtConfig, too_new.CvtForImageClassification = cvt_config, refused
    monkeypatch.setitem(sys.modules, "transformers", too_new)
    code, _, err = run_cli(capsys, "--model", "cvt_13", "--compare", "hf", "--runs", "1", "--no-memory")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "transformers cannot build its CvT model here: CvtForImageClassification requires PyTorch" in err
    assert "pip install 'transformers<5'" in err


def test_out_of_memory_gives_one_line_and_exit_1(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def exhausted(x: torch.Tensor, target: torch.Tensor) -> None:
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")

    # the real model is built, the timed step then fails to allocate
    monkeypatch.setattr(benchmark.timing, "make_step", lambda model, cfg: exhausted)
    code, _, err = run_cli(
        capsys, "--model", "cvt_tiny", "--img-size", "32", "--batch-size", "4096", "--runs", "1"
    )
    assert code == 1
    assert "batch size 4096" in err and "does not fit in memory" in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "error",
    [
        RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: you "
                     "tried to allocate 30105600000 bytes. Error code 12 (Cannot allocate memory)"),
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 28.04 GiB"),
    ],
)  # fmt: skip
def test_batch_too_large_to_create_gives_one_line_and_exit_1(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, error: Exception
) -> None:
    def allocate(cfg: BenchConfig, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
        raise error  # what creating 50000 images of 224x224 does on a machine with less than 30 GB

    monkeypatch.setattr(benchmark.timing, "make_batch", allocate)
    code, _, err = run_cli(
        capsys, "--model", "cvt_tiny", "--img-size", "224", "--batch-size", "50000", "--runs", "1",
        "--warmup", "0",
    )  # fmt: skip
    assert code == 1
    assert "batch size 50000 at 224x224" in err and "does not fit in memory" in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("json_output", [False, True])
def test_bf16_ceiling_is_not_measured_where_bf16_is_emulated(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, json_output: bool
) -> None:
    def too_slow(dtype: str, device: str) -> float:
        raise AssertionError("six emulated 2048^3 bf16 products take minutes")

    monkeypatch.setattr(cpu_kernels, "CPU_HAS_BF16_KERNELS", False)
    monkeypatch.setattr(benchmark, "matmul_ceiling", too_slow)
    args = ["--model", "cvt_tiny", "--img-size", "32", "--batch-size", "1", "--dtype", "bf16",
            "--device", "cpu", "--runs", "1", "--warmup", "0", "--no-memory"]  # fmt: skip
    code, out, _ = run_cli(capsys, *args, *(["--json"] if json_output else []))
    assert code == 0
    if json_output:
        report = json.loads(out)
        (result,) = report["results"]
        assert result["ceiling_gflops_per_s"] is None and result["ceiling_fraction"] is None
        assert "emulated" in result["ceiling_not_measured"]
        assert report["machine"]["bf16_kernels"] is False
    else:
        header, machine, *table, basis = out.splitlines()
        assert "matmul ceiling not measured: bf16 matrix products are emulated" in header
        assert machine == f"Machine: {benchmark.describe_machine(benchmark.machine_info('cpu'))}"
        assert "bf16 kernels no" in machine
        assert table[-1].split("|")[6].strip() == "-"  # the "of ceiling" column
        assert basis.startswith("GFLOP/s: the whole network's multiply-accumulates per image for every")


def test_compare_hf_with_a_model_transformers_cannot_express(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("transformers")
    code, _, err = run_cli(capsys, "--model", "cvt_tiny", "--compare", "hf", "--runs", "1", "--no-memory")
    assert code == 2
    assert "--compare hf: transformers' CvT cannot express this model: stages.1 has 1 block(s)" in err
    assert "export" not in err and len(err.strip().splitlines()) == 1


def test_pretrained_tag_names_are_benchmarked_with_random_weights(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(benchmark, "matmul_ceiling", lambda dtype, device: 100.0)
    code, out, _ = run_cli(
        capsys, "--model", "cvt_13.msft_in1k", "--img-size", "32", "--batch-size", "1", "--runs", "1",
        "--warmup", "0", "--no-memory", "--json",
    )  # fmt: skip
    assert code == 0
    report = json.loads(out)
    assert report["config"]["model"] == "cvt_13.msft_in1k"
    (ours,) = report["results"]
    assert ours["gflops_per_s"] == pytest.approx(
        2 * count_gmacs(create_model("cvt_13"), (32, 32)) * ours["img_per_s"]
    )


def test_unknown_pretrained_tag_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(capsys, "--model", "cvt_13.bogus")
    assert code == 2 and "unknown pretrained tag in 'cvt_13.bogus'; cvt_13 has: cvt_13.msft_in1k" in err


def test_device_auto_is_resolved_as_by_the_other_commands(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(benchmark, "matmul_ceiling", lambda dtype, device: 100.0)
    args = ["--model", "cvt_tiny", "--batch-size", "1", "--runs", "1", "--warmup", "0", "--no-memory",
            "--json"]  # fmt: skip
    code, out, _ = run_cli(capsys, *args)  # no --device: auto
    assert code == 0
    assert json.loads(out)["config"]["device"] == str(resolve_device("auto"))
    assert run_cli(capsys, *args, "--device", "auto")[0] == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_is_refused_as_by_the_other_commands(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(capsys, "--model", "cvt_tiny", "--device", "cuda")
    assert code == 2
    assert "device 'cuda' asked for, but torch sees no CUDA GPU" in err and len(err.strip().splitlines()) == 1


def test_info_refuses_a_negative_class_count(capsys: pytest.CaptureFixture[str]) -> None:
    """The model's own check, worded as for cvt export (cvt info repeated it)."""
    assert main(["info", "cvt_13", "--num-classes", "-5"]) == 2
    err = capsys.readouterr().err
    assert err == "cvt info: error: num_classes must be a whole number >= 0 (0: no classifier), got -5\n"
    assert main(["info", "--num-classes", "-5"]) == 2  # every variant
    assert capsys.readouterr().err == err


def test_keep_freed_memory_is_applied_before_measuring_and_reported(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    measure = benchmark.run_benchmark
    monkeypatch.setattr(allocator, "keep_freed_memory", lambda: calls.append("keep"))
    monkeypatch.setattr(benchmark, "run_benchmark", lambda *a: calls.append("measure") or measure(*a))
    code, out, _ = run_cli(
        capsys, "--model", "cvt_tiny", "--runs", "1", "--warmup", "0", "--no-memory", "--keep-freed-memory",
        "--json",
    )  # fmt: skip
    assert code == 0 and calls == ["keep", "measure"]
    assert json.loads(out)["config"]["keep_freed_memory"] is True


def test_keep_freed_memory_without_glibc_gives_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(allocator, "glibc", lambda: None)
    code, _, err = run_cli(capsys, "--model", "cvt_tiny", "--keep-freed-memory", "--runs", "1", "--no-memory")
    assert code == 2
    assert "needs glibc's malloc" in err and len(err.strip().splitlines()) == 1


def test_cpu_peak_memory_without_proc_gives_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # a system without Linux's /proc (macOS): the peak cannot be read, so ask for --no-memory up front
    monkeypatch.setattr(benchmark.memory, "PROC_SELF", tmp_path / "no-proc")
    code, _, err = run_cli(capsys, "--model", "cvt_tiny", "--runs", "1", "--warmup", "0", "--device", "cpu")
    assert code == 2
    assert "pass --no-memory" in err and len(err.strip().splitlines()) == 1
    # without the memory measurement the same benchmark runs
    code, _, _ = run_cli(
        capsys, "--model", "cvt_tiny", "--runs", "1", "--warmup", "0", "--device", "cpu", "--no-memory"
    )
    assert code == 0


Measured = list[tuple[BenchConfig, list[str] | None]]


def fake_measurement(monkeypatch: pytest.MonkeyPatch, results: list[BenchResult]) -> Measured:
    """Makes ``cvt bench`` report ``results`` without measuring; returns the list of the (configuration,
    peers) it is asked to measure."""
    calls: Measured = []

    def measure(cfg: BenchConfig, compare: list[str] | None = None) -> list[BenchResult]:
        calls.append((cfg, compare))
        return results

    monkeypatch.setattr(benchmark, "run_benchmark", measure)
    return calls


def test_bench_options_reach_the_measured_configuration(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, fake_result
) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)  # taskset -c 0,1
    results = [fake_result(name, [10.0]) for name in ("cvt", "hf", "official")]
    calls = fake_measurement(monkeypatch, results)
    code, out, _ = run_cli(
        capsys, "--model", "cvt_tiny", "--img-size", "40,48", "--batch-size", "3", "--mode", "train",
        "--dtype", "bf16", "--device", "cpu", "--compile", "--compile-mode", "max-autotune",
        "--channels-last", "--grad-checkpointing", "--compare", "all", "--warmup", "4", "--runs", "6",
        "--threads", "2", "--no-memory", "--json",
    )  # fmt: skip
    assert code == 0
    ((cfg, peers),) = calls
    assert cfg == BenchConfig(
        model="cvt_tiny", img_size=(40, 48), batch_size=3, mode="train", dtype="bf16", compile=True,
        compile_mode="max-autotune", channels_last=True, grad_checkpointing=True, warmup=4, runs=6,
        device="cpu", measure_memory=False,
    )  # fmt: skip
    assert peers == ["hf", "official"]  # all: both peers, transformers' first
    config = json.loads(out)["config"]
    assert config["threads"] == 2 and config["img_size"] == [40, 48] and config["keep_freed_memory"] is False


def test_bench_defaults_are_the_documented_ones(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, fake_result
) -> None:
    calls = fake_measurement(monkeypatch, [fake_result("cvt", [10.0])])
    code, out, _ = run_cli(capsys, "--device", "cpu", "--json")
    assert code == 0
    ((cfg, peers),) = calls
    assert cfg == BenchConfig(device="cpu")  # cvt_13 at its own size, batch 8, 2 warm-up and 5 timed runs
    assert (cfg.batch_size, cfg.warmup, cfg.runs, cfg.mode, cfg.measure_memory) == (8, 2, 5, "infer", True)
    assert peers == []
    config = json.loads(out)["config"]
    assert config["threads"] == torch.get_num_threads() and config["img_size"] == [224, 224]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--threads", "0"], "--threads must be >= 1, got 0"),
        (["--runs", "0"], "runs must be >= 1"),
        (["--warmup", "-1"], "warmup >= 0"),
    ],
)
def test_counts_below_their_minimum_give_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    code, out, err = run_cli(capsys, "--model", "cvt_tiny", "--no-memory", *args)
    assert code == 2 and not out
    assert message in err and len(err.strip().splitlines()) == 1


def test_as_many_threads_as_usable_cpus_are_accepted(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, fake_result
) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)  # taskset -c 0,1
    threads: list[int] = []
    results = [fake_result("cvt", [10.0])]
    monkeypatch.setattr(
        benchmark, "run_benchmark", lambda *a: threads.append(torch.get_num_threads()) or results
    )
    code, _, _ = run_cli(capsys, "--model", "cvt_tiny", "--threads", "2", "--no-memory")
    assert code == 0 and threads == [2]


def test_bench_table_shows_every_figure(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, fake_result
) -> None:
    ours, peer = fake_result("cvt", [30.0, 27.0, 33.0]), fake_result("hf", [24.0, 18.0, 20.0])
    for r, memory, gflops in ((ours, 123.4, 45.67), (peer, None, 31.0)):
        r.peak_memory_mb, r.gflops_per_s = memory, gflops
        r.ceiling_gflops_per_s, r.ceiling_fraction = 250.0, gflops / 250.0
    calls = fake_measurement(monkeypatch, [ours, peer])
    monkeypatch.setattr(allocator, "keep_freed_memory", lambda: None)
    code, out, _ = run_cli(
        capsys, "--model", "cvt_tiny", "--img-size", "40,48", "--batch-size", "4", "--mode", "train",
        "--device", "cpu", "--warmup", "1", "--runs", "3", "--compare", "hf", "--keep-freed-memory",
    )  # fmt: skip
    assert code == 0 and len(calls) == 1
    header, machine, *table, basis = out.splitlines()
    assert header == (
        f"cvt_tiny 40x48 batch 4 train fp32 on cpu ({torch.get_num_threads()} threads, freed memory kept in "
        "the timed runs), 3 runs; matmul ceiling 250 GFLOP/s"
    )
    assert machine.startswith("Machine: ") and basis.startswith("GFLOP/s: ")
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in table if line.startswith("| ")]
    assert rows[-2:] == [
        ["cvt", "30.00", "27.00-33.00", "123", "45.7", "18%", "1.00x"],
        ["hf", "20.00", "18.00-24.00", "-", "31.0", "12%", "1.50x (1.25-1.65)"],  # rounds 30/24 27/18 33/20
    ]


def test_bench_header_names_the_options_that_change_what_was_measured(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, fake_result
) -> None:
    """Compiled, channels-last or checkpointed runs say so above the table (only ``--json`` did)."""
    fake_measurement(monkeypatch, [fake_result("cvt", [10.0])])
    code, out, _ = run_cli(
        capsys, "--model", "cvt_tiny", "--device", "cpu", "--runs", "1", "--no-memory", "--compile",
        "--compile-mode", "max-autotune", "--channels-last", "--grad-checkpointing", "--mode", "train",
    )  # fmt: skip
    assert code == 0
    assert out.splitlines()[0].startswith(
        "cvt_tiny 32x32 batch 8 train fp32, compile (max-autotune), channels-last, gradient checkpointing "
        "(cvt only) on cpu ("
    )


def test_bench_json_speedup_is_the_ratio_of_the_medians(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, fake_result
) -> None:
    ours, peer = fake_result("cvt", [30.0, 27.0, 60.0]), fake_result("official", [24.0, 18.0, 20.0])
    fake_measurement(monkeypatch, [ours, peer])
    code, out, _ = run_cli(capsys, "--model", "cvt_tiny", "--compare", "official", "--no-memory", "--json")
    assert code == 0
    report = json.loads(out)
    assert report["speedup"] == {"official": pytest.approx(1.5)}  # 30 / 20, not the fastest runs' 60 / 24
    assert report["speedup_per_round"] == {"official": pytest.approx([1.25, 1.5, 3.0])}
