"""Faults during a real ``cvt train`` process: SIGKILL mid-epoch, then ``--resume`` (Ctrl-C at a known step:
``test_robustness.py``).

Each test starts a training subprocess, stops it once it has written a mid-run ``last.pt``, resumes
it in this process and checks that the final weights equal those of an uninterrupted run
(``--deterministic``, one thread in both processes, so the float arithmetic is identical).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cvt.engine import resolve_run, train
from cvt.engine.resume import check_not_rewinding
from cvt.engine.state import atomic_torch_save
from cvt.errors import UsageError

MICRO = dict(
    img_size=16, train_subset=64, batch_size=16, epochs=3, warmup_epochs=0.5, lr=3e-3, seed=5,
    deterministic=True, save_every_steps=1, random_crop=True,
    model_args={"embed_dim": [8, 16, 32], "depth": [1, 1, 1], "num_heads": [1, 1, 2], "drop_path_rate": 0.1},
)  # fmt: skip
TOTAL_STEPS = 12  # 3 epochs x 64 images / 16


def as_argv(flags: dict) -> list[str]:
    argv = []
    for key, value in flags.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif key == "model_args":
            argv += [flag, *(f"{k}={v}".replace(" ", "") for k, v in value.items())]
        else:
            argv += [flag, str(value)]
    return argv


def reference_weights(tmp_path: Path) -> dict[str, torch.Tensor]:
    cfg, _ = resolve_run(None, {**MICRO, "output": str(tmp_path / "reference")})
    train(cfg)
    return torch.load(tmp_path / "reference" / "last.pt", weights_only=True)["model"]


def start_and_stop(run_dir: Path, sig: int) -> subprocess.CompletedProcess:
    """Start ``cvt train`` and send ``sig`` as soon as its first mid-run ``last.pt`` exists."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CI": "1"}
    argv = [sys.executable, "-m", "cvt", "train", *as_argv({**MICRO, "output": str(run_dir)})]
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (run_dir / "last.pt").exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the training process wrote no checkpoint in 300 s"
        time.sleep(0.02)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def resume_and_compare(run_dir: Path, reference: dict[str, torch.Tensor]) -> None:
    stopped_at = torch.load(run_dir / "last.pt", weights_only=True)["step"]
    assert 0 < stopped_at < TOTAL_STEPS  # it really stopped mid-run
    cfg, ckpt = resolve_run(None, {"resume": "auto", "output": str(run_dir)})
    summary = train(cfg, ckpt)
    assert summary["steps"] == TOTAL_STEPS
    final = torch.load(run_dir / "last.pt", weights_only=True)["model"]
    for key, value in reference.items():
        assert torch.equal(final[key], value), f"{key} differs after resuming from step {stopped_at}"


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_gives_the_uninterrupted_weights(tmp_path):
    reference = reference_weights(tmp_path)
    stopped = start_and_stop(tmp_path / "killed", signal.SIGKILL)
    assert stopped.returncode == -signal.SIGKILL
    resume_and_compare(tmp_path / "killed", reference)


def test_a_best_pt_at_the_step_of_its_runs_last_pt_continues_in_its_folder(tmp_path):
    """An epoch that is the best so far ends with best.pt and last.pt of the same step: continuing that
    best.pt in its own folder rewinds nothing and is allowed; a last.pt one step further on is refused."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    best = {"step": 4, "epoch": 1, "model": {"w": torch.ones(2)}}
    atomic_torch_save(best, run_dir / "best.pt")
    atomic_torch_save(best, run_dir / "last.pt")
    check_not_rewinding(run_dir / "best.pt", run_dir, best)  # the same step: nothing to discard

    atomic_torch_save({**best, "step": 5}, run_dir / "last.pt")
    with pytest.raises(UsageError, match=r"last\.pt is further on than .*best\.pt \(step 5 against 4\)"):
        check_not_rewinding(run_dir / "best.pt", run_dir, best)
    check_not_rewinding(run_dir / "last.pt", run_dir, {**best, "step": 5})  # last.pt itself
    # another folder's best.pt is not this run's to rewind (check_run_dir refuses mixing runs)
    other = tmp_path / "other"
    other.mkdir()
    atomic_torch_save(best, other / "best.pt")
    check_not_rewinding(other / "best.pt", run_dir, best)

    atomic_torch_save({**best, "step": 3}, run_dir / "last.pt")  # behind best.pt: nothing later to discard
    check_not_rewinding(run_dir / "best.pt", run_dir, best)
