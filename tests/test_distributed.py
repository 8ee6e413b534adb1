"""``torchrun --nproc_per_node 2 -m cvt train`` on CPU (gloo) equals one process with the same global batch.

BatchNorm would make the two runs differ by design: in ``dw_bn`` projections each process
normalises with the statistics of its own half batch, and ``--sync-bn`` (torch's SyncBatchNorm) is
GPU-only. The test therefore uses ``method=avg`` projections (no BatchNorm; LayerNorm is per token)
and no stochastic depth, so both runs compute the same function of the same samples: gradients
all-reduced over 2 x 8 images equal the gradient of the 16-image batch, up to float rounding. Random
crops stay on: they are seeded per image (``cvt.data.seeding``), so every rank draws what one process
would. A second test runs ``dw_bn`` under DDP, whose last block leaves its q convolution unused
(``cls_only_last_block``): DDP needs a gradient for it at every step.
"""

from __future__ import annotations

import contextlib
import gc
import os
import subprocess
import sys
import weakref

import pytest
import torch
import torch.distributed as dist

from cvt.devices import resolve_device
from cvt.engine import resolve_run, train
from cvt.engine.distributed import (
    DistEnv,
    any_rank,
    init_distributed,
    mean_over_ranks,
    shutdown_distributed,
)

# SGD, not AdamW: the key bias gets a zero gradient up to rounding (softmax ignores a constant added to
# every logit of a row), and Adam would scale that rounding noise up to full-size updates.
MICRO = dict(
    img_size=16, train_subset=64, epochs=2, warmup_epochs=0.5, optimizer="sgd", lr=0.05, seed=2,
    random_crop=True,  # seeded per image: the same crops in one process and in two
    model_args={"embed_dim": [8, 16, 32], "depth": [1, 1, 1], "num_heads": [1, 1, 2], "method": "avg",
                "drop_path_rate": 0.0},
)  # fmt: skip


def as_argv(flags: dict) -> list[str]:
    argv = []
    for key, value in flags.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else flag.replace("--", "--no-", 1))
        elif key == "model_args":
            argv += [flag, *(f"{k}={v}" for k, v in value.items())]
        else:
            argv += [flag, str(value)]
    return argv


def train_in_two_processes(flags: dict) -> subprocess.CompletedProcess:
    """``cvt train`` under ``torch.distributed.run`` with 2 gloo processes of one thread each; asserts
    that it succeeded (DDP also fails a run whose parameters miss a gradient)."""
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "-m", "cvt", "train", *as_argv(flags)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CI": "1"}
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.mark.slow
def test_two_gloo_processes_match_one_process_with_the_same_global_batch(tmp_path):
    cfg, _ = resolve_run(None, {**MICRO, "batch_size": 16, "output": str(tmp_path / "single")})
    single = train(cfg)  # one thread (conftest), as each DDP process below

    done = train_in_two_processes({**MICRO, "batch_size": 8, "output": str(tmp_path / "ddp")})
    assert "global batch 16" in done.stdout and "2 process(es)" in done.stdout
    assert done.stdout.count("epoch 2/2") == 1  # only rank 0 prints and writes

    a = torch.load(tmp_path / "single" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "ddp" / "last.pt", weights_only=True)
    assert a["step"] == b["step"] == 8
    for key, value in a["model"].items():
        torch.testing.assert_close(b["model"][key], value, rtol=0, atol=1e-5, msg=key)
    ddp_summary = (tmp_path / "ddp" / "summary.json").read_text()
    assert f'"final_top1": {single["final_top1"]}' in ddp_summary


@pytest.mark.slow
def test_ddp_trains_dw_bn_whose_last_q_convolution_gets_zero_gradients(tmp_path):
    flags = {**MICRO, "batch_size": 8, "output": str(tmp_path / "ddp"), "epochs": 1,
             "model_args": {**MICRO["model_args"], "method": "dw_bn"}}  # fmt: skip
    done = train_in_two_processes(flags)  # DDP refuses a parameter without a gradient
    # nor does either process warn (DDP's "Grad strides do not match" for the depthwise weights)
    assert "warning" not in done.stderr.lower(), done.stderr[-3000:]
    assert torch.load(tmp_path / "ddp" / "last.pt", weights_only=True)["step"] == 4


def test_collectives_reduce_in_buffers_that_outlive_the_call(monkeypatch):
    """The tensor each collective reduces in is still referenced after the call returns, so a gloo worker
    never drops the last reference to it. With torch 2.5.1 a temporary there deadlocked about one
    ``torchrun`` exit in two: the worker waited for the GIL holding the group's lock, and the group's
    destructor waited for that lock holding the GIL."""
    other_rank = iter([[1.0], [0.0], [10.0, 20.0]])  # what a second process contributes to each call
    reduced_in: list[weakref.ref] = []

    def all_reduce(tensor, op=dist.ReduceOp.SUM):
        reduced_in.append(weakref.ref(tensor))
        other = torch.tensor(next(other_rank), dtype=tensor.dtype)
        tensor.copy_(torch.maximum(tensor, other) if op == dist.ReduceOp.MAX else tensor + other)

    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    env = DistEnv(rank=0, world_size=2, device=torch.device("cpu"))
    assert any_rank(env, False) is True
    assert any_rank(env, False) is False
    assert mean_over_ranks(env, [2.0, 4.0]) == [6.0, 12.0]
    gc.collect()
    buffers = [ref() for ref in reduced_in]
    assert all(buffer is not None for buffer in buffers)
    assert buffers[0] is buffers[1] and buffers[2].dtype == torch.float64  # one buffer per length and dtype


def test_a_process_group_made_by_the_caller_outlives_training_setup(tmp_path, monkeypatch):
    """A launcher that made its own group before calling cvt keeps it: shutdown ends only a group that
    init_distributed created (it used to destroy whatever group there was)."""
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun would say; the caller's group already exists
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        env = init_distributed("cpu")
        assert env.distributed and not env.owns_group
        shutdown_distributed(env)
        assert dist.is_initialized()
    finally:
        dist.destroy_process_group()


def test_each_process_gets_the_gpu_of_its_local_rank(monkeypatch):
    """``--device cuda`` (or auto) under torchrun: process 1 of a node on GPU 1, not all on GPU 0; an
    explicit index is kept."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("cuda", local_rank=1) == torch.device("cuda", 1)
    assert resolve_device("auto", local_rank=1) == torch.device("cuda", 1)
    assert resolve_device("cuda:0", local_rank=1) == torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto", local_rank=1) == torch.device("cpu")


@pytest.mark.parametrize("name", ["mps", "meta", "xpu:0"])
def test_devices_other_than_cpu_and_cuda_are_refused_before_the_run_starts(name, tmp_path, capsys):
    """torch parses these names, then fails deep inside ('internal error'); meta also left config.yaml
    and tb/ behind in the run folder."""
    from cvt.cli.main import main
    from cvt.errors import UsageError

    with pytest.raises(UsageError, match=f"must be auto, cpu, cuda or cuda:N, got '{name}'"):
        resolve_device(name)
    assert main(["train", "--device", name, "--output", str(tmp_path / "run")]) == 2
    assert f"got '{name}'" in capsys.readouterr().err and not (tmp_path / "run").exists()


@contextlib.contextmanager
def callers_group(tmp_path, monkeypatch, **environ):
    """A one-process gloo group made by the caller, with the torchrun variables ``environ`` (WORLD_SIZE,
    RANK …): cvt trains in it as the process of that rank among that many (their collectives are this
    process's own values; DDP wraps the model in the group)."""
    for name, value in environ.items():
        monkeypatch.setenv(name, str(value))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_a_process_takes_its_global_rank_and_the_gpu_of_its_local_rank(tmp_path, monkeypatch):
    """Process 1 of the second node of 2 x 2: RANK 3 of WORLD_SIZE 4 (not LOCAL_RANK 1 nor
    LOCAL_WORLD_SIZE 2, which would make it a second rank 1) on GPU 1, its local rank."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with callers_group(tmp_path, monkeypatch, WORLD_SIZE=4, RANK=3, LOCAL_RANK=1, LOCAL_WORLD_SIZE=2):
        env = init_distributed("cuda")
    assert (env.rank, env.world_size, env.device) == (3, 4, torch.device("cuda", 1))
    assert env.distributed and not env.is_main


def ddp_forwards(monkeypatch) -> list[tuple[bool, int]]:
    """Patch DDP so that every forward through it (the training steps; validation calls the raw model)
    appends whether its backward all-reduces the gradients, and the torch seed it runs under."""
    forwards: list[tuple[bool, int]] = []

    class RecordingDDP(torch.nn.parallel.DistributedDataParallel):
        def forward(self, *args, **kwargs):
            forwards.append((self.require_backward_grad_sync, torch.initial_seed()))
            return super().forward(*args, **kwargs)

    monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel", RecordingDDP)
    return forwards


def test_ddp_all_reduces_gradients_on_the_last_micro_batch_of_each_window_only(tmp_path, monkeypatch):
    """With --accum-steps 2 the first micro-batch of a window runs under no_sync (its gradients stay
    local) and the second all-reduces the window's sum: an all-reduce on the first would leave the
    second's gradients different on every rank."""
    forwards = ddp_forwards(monkeypatch)
    flags = {**MICRO, "epochs": 1, "batch_size": 8, "accum_steps": 2, "output": str(tmp_path / "run")}
    with callers_group(tmp_path, monkeypatch, WORLD_SIZE=2, RANK=0):
        summary = train(resolve_run(None, flags)[0])
    assert summary["steps"] == 2  # 64 images in steps of 8 x 2 processes x 2
    assert [sync for sync, _ in forwards] == [False, True, False, True]
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["step"] == 2


def test_a_rank_other_than_0_writes_no_file_and_draws_its_own_random_stream(tmp_path, monkeypatch):
    """Rank 1 trains but leaves the run folder to rank 0, --save-every-steps included; its dropout
    and stochastic depth draw from a stream of its own (seeded with --seed + rank, not rank 0's)."""
    forwards = ddp_forwards(monkeypatch)
    flags = {**MICRO, "epochs": 1, "batch_size": 8, "save_every_steps": 1, "output": str(tmp_path / "run")}
    with callers_group(tmp_path, monkeypatch, WORLD_SIZE=2, RANK=1):
        summary = train(resolve_run(None, flags)[0])
    assert summary["steps"] == 4 and len(forwards) == 4
    assert not (tmp_path / "run").exists()
    assert {seed for _, seed in forwards} == {MICRO["seed"] + 1}
