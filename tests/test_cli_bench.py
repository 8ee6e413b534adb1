"""``cvt bench``: JSON report on a tiny model, the official peer check, and one-line errors (issue 4)."""

from __future__ import annotations

import json

import pytest
import torch

from cvt import benchmark
from cvt.benchmark import BenchConfig, build_subjects
from cvt.cli.main import main
from cvt.complexity import count_gmacs
from cvt.models import create_model


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["bench", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_bench_json_on_tiny_model_against_official(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(
        capsys, "--model", "cvt_tiny", "--img-size", "32", "--batch-size", "2", "--runs", "3",
        "--warmup", "0", "--compare", "official", "--no-memory", "--json",
    )  # fmt: skip
    assert code == 0
    report = json.loads(out)
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
        (["--batch-size", "0"], "must be >= 1"),
        (["--compile", "--compile-mode", "fastest"], "compile mode must be one of"),
    ],
)
def test_bad_options_give_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    code, _, err = run_cli(capsys, *args)
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1


def test_compare_hf_without_transformers(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(__import__("sys").modules, "transformers", None)  # import fails
    code, _, err = run_cli(capsys, "--model", "cvt_13", "--compare", "hf", "--runs", "1", "--no-memory")
    assert code == 2
    assert "needs the transformers package" in err and len(err.strip().splitlines()) == 1


def test_out_of_memory_gives_one_line_and_exit_1(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def exhausted(x: torch.Tensor, target: torch.Tensor) -> None:
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")

    # the real model is built, the timed step then fails to allocate
    monkeypatch.setattr(benchmark, "make_step", lambda model, cfg: exhausted)
    code, _, err = run_cli(
        capsys, "--model", "cvt_tiny", "--img-size", "32", "--batch-size", "4096", "--runs", "1"
    )
    assert code == 1
    assert "batch size 4096" in err and "does not fit in memory" in err
    assert len(err.strip().splitlines()) == 1
