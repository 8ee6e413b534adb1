"""What protects a run folder and the work in it: the lock against a second run, the best.pt of an
epoch whose last.pt a kill prevented, --overwrite's reach, SIGTERM/SIGINT at any point, ablations
that continue, and refusals that come before any work (a path under a file, a checkpoint that does
not fit)."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

from cvt.cli.main import main
from cvt.engine import NonFiniteLossError
from cvt.engine.state import atomic_torch_save
from cvt.errors import CheckpointError, CvtError, UsageError
from test_engine import MICRO, REAL_CROSS_ENTROPY, contents, fake_run, micro, run, watch_training_losses
from test_resume import as_argv

# another process holding a run folder's lock as cvt's does: flock on <folder>/.lock, "pid command"
HOLD_LOCK = textwrap.dedent(
    """
    import fcntl, os, sys
    os.makedirs(sys.argv[1], exist_ok=True)
    fd = os.open(os.path.join(sys.argv[1], ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(fd, f"{os.getpid()} cvt train\\n".encode())
    print("locked", flush=True)
    sys.stdin.read()
    """
)


@pytest.fixture
def no_curves(monkeypatch):
    """Skip drawing curves.png in these tests (as test_engine's fixture of that name)."""
    monkeypatch.setattr("cvt.engine.trainer.plot_curves", lambda run_dir, history, topk=5: None)


@pytest.fixture
def held_lock():
    """``hold(folder)``: another process locks ``folder`` until the test ends; returns its pid."""
    procs = []

    def hold(folder):
        proc = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(folder)], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True)  # fmt: skip
        procs.append(proc)
        assert proc.stdout.readline().strip() == "locked"
        return proc.pid

    yield hold
    for proc in procs:
        proc.stdin.close()
        proc.wait(timeout=30)


# ---- 1. one run per folder


def test_a_run_folder_in_use_is_refused_untouched(tmp_path, held_lock, no_curves):
    """A second `cvt train` into the folder of a run still training, fresh or --resume auto, is refused
    before it writes anything; so is a fresh run into a new folder another run has just created."""
    out = tmp_path / "run"
    run(micro(tmp_path, epochs=1))
    pid = held_lock(out)
    before = contents(out)
    for flags in (micro(tmp_path, epochs=2, resume="auto"), micro(tmp_path, epochs=1, overwrite=True)):
        with pytest.raises(
            UsageError, match=rf"run folder .*run is in use by another cvt train \(pid {pid}\)"
        ):
            run(flags)
        assert contents(out) == before

    new = tmp_path / "new"
    held_lock(new)
    with pytest.raises(UsageError, match="is in use by another cvt train"):
        run(micro(tmp_path, "new", epochs=1))
    assert sorted(p.name for p in new.iterdir()) == [".lock"]


def test_a_second_run_started_during_a_run_is_refused(tmp_path, monkeypatch):
    """Two runs into one folder at once (here the second starts while the first saves its epoch)."""
    refused = []

    def second_run(run_dir, history, topk=5):
        with pytest.raises(UsageError) as info:
            run(micro(tmp_path, epochs=3, resume="auto", seed=4))
        refused.append(str(info.value))

    monkeypatch.setattr("cvt.engine.trainer.plot_curves", second_run)
    summary = run(micro(tmp_path, epochs=2))
    assert len(refused) == 2 and f"in use by another cvt train (pid {os.getpid()})" in refused[0]
    assert (
        summary["epochs"] == 2 and torch.load(tmp_path / "run" / "last.pt", weights_only=True)["epoch"] == 2
    )
    assert not (tmp_path / "run" / ".lock").exists()  # released, and removed, at the end


def test_the_lock_file_of_a_killed_run_is_no_content(tmp_path, no_curves):
    """kill -9 leaves .lock behind, unlocked: the next run takes it over, and it is not counted as
    content of the folder (neither for a fresh run nor for --resume auto of a run killed early)."""
    out = tmp_path / "run"
    out.mkdir()
    (out / ".lock").write_text("12345 cvt train\n")
    assert run(micro(tmp_path, epochs=1))["epochs"] == 1
    assert not (out / ".lock").exists()

    for name in ("last.pt", "best.pt", "metrics.csv", "summary.json"):  # killed before its first save
        (out / name).unlink()
    (out / ".lock").write_text("12345 cvt train\n")
    assert run(micro(tmp_path, epochs=1, resume="auto"))["steps"] == 4


def test_a_refused_run_leaves_no_folder_it_created(tmp_path):
    with pytest.raises(UsageError, match="smaller than the data set's 10 classes"):
        run(micro(tmp_path, "a/b/new", num_classes=5))
    assert not (tmp_path / "a").exists()


def test_an_ablation_folder_in_use_is_refused(tmp_path, held_lock, monkeypatch, capsys):
    monkeypatch.setattr("cvt.ablation.training.train_variant", lambda cfg: pytest.fail("trained"))
    out = tmp_path / "ablation"
    pid = held_lock(out)
    assert main(["ablate", "--family", "kv_stride", "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"run folder {out} is in use by another cvt train (pid {pid})" in err and err.count("\n") == 1


def test_a_lock_file_removed_by_its_ending_holder_is_taken_over(tmp_path, monkeypatch):
    """A run ending between this one's open and lock of .lock removes the file: the lock is taken again
    on a new one, not refused as in use; only processes that keep doing so are refused."""
    from cvt.engine import rundir

    real_flock, calls = rundir.fcntl.flock, []

    def holder_ends_first(fd, operation):
        calls.append(fd)
        if len(calls) == 1:
            (tmp_path / "run" / ".lock").unlink()  # the holder's exit, just before this lock
        real_flock(fd, operation)

    monkeypatch.setattr(rundir.fcntl, "flock", holder_ends_first)
    with rundir.lock_run_dir(tmp_path / "run", "cvt train"):
        assert (tmp_path / "run" / ".lock").read_text() == f"{os.getpid()} cvt train\n"
    assert len(calls) == 2 and not (tmp_path / "run").exists()

    def holders_keep_ending(fd, operation):
        calls.append(fd)
        (tmp_path / "run" / ".lock").unlink()
        real_flock(fd, operation)

    calls.clear()
    monkeypatch.setattr(rundir.fcntl, "flock", holders_keep_ending)
    refused = pytest.raises(UsageError, match="in use by other cvt processes starting and ending")
    with refused, rundir.lock_run_dir(tmp_path / "run"):
        pytest.fail("ran without the lock")
    assert len(calls) == 10 and not (tmp_path / "run").exists()


def test_a_file_system_without_locks_runs_unlocked_with_a_warning(tmp_path, monkeypatch):
    """flock failing with ENOLCK (some network file systems): the block runs, warned, and leaves neither
    a .lock nor the folder it created behind."""
    import errno

    from cvt.engine import rundir

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(rundir.fcntl, "flock", no_locks)
    ran = []
    warned = pytest.warns(UserWarning, match=r"cannot lock the run folder .*new \(No locks available\)")
    with warned, rundir.lock_run_dir(tmp_path / "a" / "new"):
        ran.append(sorted(p.name for p in (tmp_path / "a" / "new").iterdir()))
    assert ran == [[]] and not (tmp_path / "a").exists()


# ---- 2. a best.pt ahead of the checkpoint


def best_ahead(folder, top1=99.0, same_run=True):
    """Make ``folder/best.pt`` what a kill between the saves ending epoch 2 leaves: epoch 2's best.pt
    (top-1 ``top1``) beside epoch 1's last.pt. Returns its bytes."""
    last = torch.load(folder / "last.pt", weights_only=True)
    first = {**last["history"][0], "top1": last["history"][0]["top1"] + (0 if same_run else 1)}
    history = [first, {**first, "epoch": 2, "top1": top1}]
    atomic_torch_save({**last, "epoch": 2, "history": history, "best_top1": top1, "best_epoch": 2},
                      folder / "best.pt")  # fmt: skip
    return (folder / "best.pt").read_bytes()


def test_a_best_pt_written_after_the_resumed_checkpoint_stays_the_best(tmp_path, no_curves):
    """The retrained epoch 2 (worse than 99%) neither replaces that best.pt nor becomes the summary's
    best, in the run's own folder or in a new one (where the best.pt comes along)."""
    a = tmp_path / "a"
    run(micro(tmp_path, "a", epochs=1))
    saved = best_ahead(a)
    summary = run({"resume": str(a / "last.pt"), "output": str(tmp_path / "b"), "epochs": 2})
    assert (summary["best_top1"], summary["best_epoch"]) == (99.0, 2)
    assert (tmp_path / "b" / "best.pt").read_bytes() == saved

    summary = run(micro(tmp_path, "a", epochs=2, resume="auto"))
    assert (summary["best_top1"], summary["best_epoch"]) == (99.0, 2)
    assert json.loads((a / "summary.json").read_text())["best_epoch"] == 2
    assert (a / "best.pt").read_bytes() == saved


def test_resuming_with_fewer_epochs_than_trained_is_refused_untouched(tmp_path, no_curves):
    """A finished 2-epoch run resumed with --epochs 1 trained nothing, and rewrote config.yaml and
    summary.json to say 1 epoch while metrics.csv kept 2 rows."""
    run(micro(tmp_path, "a", epochs=2))
    before = contents(tmp_path / "a")
    with pytest.raises(UsageError, match="trained 2 epochs already, more than --epochs 1: pass --epochs 2"):
        run(micro(tmp_path, "a", epochs=1, resume="auto"))
    assert contents(tmp_path / "a") == before


def test_a_best_pt_of_another_history_is_not_taken_over(tmp_path, no_curves):
    from cvt.engine.resume import carry_best

    a = tmp_path / "a"
    run(micro(tmp_path, "a", epochs=1))
    best_ahead(a, same_run=False)  # its epoch 1 is not the checkpoint's
    last = torch.load(a / "last.pt", weights_only=True)
    progress = {k: last[k] for k in ("best_top1", "best_epoch", "history")}
    with pytest.warns(UserWarning, match="no best.pt of the best epoch so far"):
        carry_best(a / "last.pt", a, progress)
    assert (progress["best_top1"], progress["best_epoch"]) == (-1.0, 0)  # counted anew: no best.pt holds it


def test_a_checkpoint_kept_beside_another_runs_files_does_not_resume_into_them(tmp_path, no_curves):
    """A copy of run a's checkpoint kept in a folder of run b's files: resumed without --output, the
    run went into that folder, replacing b's last.pt and summary beside b's best.pt. Alone in its
    folder, a checkpoint still continues there."""
    run(micro(tmp_path, "a", epochs=1))
    run(micro(tmp_path, "b", epochs=1, seed=5))
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "a_epoch1.pt").write_bytes((tmp_path / "a" / "last.pt").read_bytes())
    for name in ("last.pt", "best.pt", "summary.json"):
        (kept / name).write_bytes((tmp_path / "b" / name).read_bytes())
    before = contents(kept)
    with pytest.raises(UsageError, match="holds other files .* beside a_epoch1.pt, not the run it continues"):
        run({"resume": str(kept / "a_epoch1.pt"), "epochs": 2})
    assert contents(kept) == before

    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / "a_epoch1.pt").write_bytes((tmp_path / "a" / "last.pt").read_bytes())
    with pytest.warns(UserWarning, match="no best.pt of the best epoch so far"):
        summary = run({"resume": str(alone / "a_epoch1.pt"), "epochs": 2})
    assert summary["epochs"] == 2 and (alone / "last.pt").is_file() and (alone / "best.pt").is_file()


def test_resuming_a_best_pt_behind_its_runs_last_pt_is_refused_untouched(tmp_path, no_curves):
    """best.pt of epoch 1 beside last.pt of epoch 2 (a worse epoch 2): continuing best.pt in the same
    folder rewound the run, overwriting last.pt and metrics.csv's row of epoch 2."""
    a = tmp_path / "a"
    run(micro(tmp_path, "a", epochs=1))
    epoch1 = (a / "last.pt").read_bytes()
    run(micro(tmp_path, "a", epochs=2, resume="auto"))
    (a / "best.pt").write_bytes(epoch1)
    before = contents(a)
    with pytest.raises(UsageError, match="last.pt is further on than .*best.pt \\(step 8 against 4\\)"):
        run(micro(tmp_path, "a", epochs=3, resume=str(a / "best.pt")))
    assert contents(a) == before


def test_a_fresh_run_into_a_run_folder_is_refused_naming_its_first_files_and_the_ways_on(tmp_path):
    from cvt.engine.rundir import check_run_dir

    fake_run(tmp_path / "a")
    with pytest.raises(UsageError) as info:
        check_run_dir(tmp_path / "a", False)
    assert str(info.value) == (
        f"run folder {tmp_path / 'a'} already has content (best.pt, config.yaml, last.pt, metrics.csv … "
        f"(5 in all)); pass --resume auto to continue it, --overwrite to replace its run files, or "
        f"--output/--name for a new folder"
    )


def test_a_checkpoint_named_by_a_relative_path_is_its_run_folders_own(tmp_path, monkeypatch):
    """`--resume a/last.pt --output /abs/a` names the run's own folder twice: it continues there, not
    refused as another run's content; a run folder of other files is still refused."""
    from cvt.engine.rundir import check_run_dir, is_own_checkpoint

    for name in ("a", "b"):
        fake_run(tmp_path / name)
    monkeypatch.chdir(tmp_path)
    assert is_own_checkpoint(Path("a/last.pt"), tmp_path / "a") is True
    assert is_own_checkpoint(Path("a/last.pt"), tmp_path / "b") is False
    check_run_dir(tmp_path / "a", False, Path("a/last.pt"))  # accepted
    shown = r"best\.pt, config\.yaml, last\.pt, metrics\.csv … \(5 in all\)"  # the first 4 names
    with pytest.raises(UsageError, match=rf"already has content \({shown}\) of another run than a/last\.pt"):
        check_run_dir(tmp_path / "b", False, Path("a/last.pt"))


@pytest.mark.parametrize("damage", ["deleted", "truncated"])
def test_a_run_resumed_without_its_best_pt_counts_the_best_anew(tmp_path, no_curves, damage):
    """A run's best.pt deleted or damaged before --resume auto: the summary named the best epoch of the
    checkpoint, which no best.pt held; now the best is counted from the epochs trained since (warned)."""
    a = tmp_path / "a"
    run(micro(tmp_path, "a", epochs=1))
    if damage == "deleted":
        (a / "best.pt").unlink()
    else:
        (a / "best.pt").write_bytes((a / "best.pt").read_bytes()[:100])
    with pytest.warns(UserWarning, match="no best.pt of the best epoch so far"):
        summary = run(micro(tmp_path, "a", epochs=2, resume="auto"))
    assert summary["best_epoch"] == 2
    best = torch.load(a / "best.pt", weights_only=True)
    assert (best["epoch"], best["best_top1"]) == (2, summary["best_top1"])


def test_a_resume_from_what_is_no_training_checkpoint_says_what_it_is(tmp_path):
    """A run folder (with the hint only where it has a last.pt), a missing file, a checkpoint without
    the config it resumes with, a file of another kind: each refused by name, not a crash further on."""
    from cvt.engine.state import load_train_checkpoint

    (tmp_path / "cut").mkdir()
    atomic_torch_save({"model": {}}, tmp_path / "cut" / "best.pt")  # killed before its first last.pt
    atomic_torch_save({"model": {}, "optimizer": {}, "epoch": 1, "step": 4}, tmp_path / "no_config.pt")
    torch.save([1, 2], tmp_path / "a_list.pt")
    said = {
        "cut": f"checkpoint {tmp_path / 'cut'} is a folder, not a last.pt/best.pt file",
        "missing.pt": f"checkpoint {tmp_path / 'missing.pt'} does not exist",
        "no_config.pt": f"{tmp_path / 'no_config.pt'} is not a cvt train checkpoint (missing config)",
        "a_list.pt": f"{tmp_path / 'a_list.pt'} is not a cvt train checkpoint "
        f"(missing model, optimizer, epoch, step, config)",
    }
    for name, message in said.items():
        with pytest.raises(CheckpointError) as info:
            load_train_checkpoint(tmp_path / name)
        assert str(info.value) == message


def test_a_checkpoints_rng_state_continues_every_generator_where_it_was(tmp_path):
    """Python's, numpy's (with its cached second normal) and torch's generators, saved in a checkpoint
    and restored after other draws, give the draws that followed the save (augmentations, drop-path
    and mixup of a resumed run are those of the uninterrupted one)."""
    import random

    import numpy as np

    from cvt.engine.state import capture_rng, restore_rng

    def draws():
        return random.random(), np.random.standard_normal(3).tolist(), torch.rand(3).tolist()

    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.standard_normal()  # an odd count: numpy keeps the second of its pair for the next draw
    atomic_torch_save({"rng": capture_rng()}, tmp_path / "last.pt")
    expected = draws()
    draws()  # the run goes on, then is killed
    np.random.standard_normal()
    restore_rng(torch.load(tmp_path / "last.pt", weights_only=True)["rng"])
    assert draws() == expected


# ---- 3. --overwrite


def test_overwrite_removes_the_run_files_and_tensorboard_events_only(tmp_path, no_curves, capsys):
    out = tmp_path / "run"
    fake_run(out)  # with tb/events.out.tfevents.1
    (out / "tb" / "mine").mkdir()
    (out / "tb" / "mine" / "keep.txt").write_text("mine")
    (out / "tb" / "notes.md").write_text("mine")
    (out / ".last.pt.mine.tmp").write_text("mine")  # a name like a temporary file's, not one of cvt's
    (out / ".last.pt.3fa9c2d1.tmp").write_bytes(b"half a save")  # a killed save's
    run(micro(tmp_path, epochs=1, overwrite=True))
    assert (out / "tb" / "mine" / "keep.txt").read_text() == (out / "tb" / "notes.md").read_text() == "mine"
    assert (out / ".last.pt.mine.tmp").read_text() == "mine"
    assert (
        not (out / ".last.pt.3fa9c2d1.tmp").exists() and not (out / "tb" / "events.out.tfevents.1").exists()
    )
    assert len(list((out / "tb").glob("events.out.tfevents.*"))) == 1  # the new run's

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    shown = " ".join(capsys.readouterr().out.split())
    assert "event files (events.out.tfevents.*) in tb/, nothing else, once the new run saves" in shown
    assert not (out / ".replaced").exists()  # the old files went with the new run's first checkpoint


def test_an_overwriting_run_that_fails_before_its_first_checkpoint_gives_the_old_run_back(
    tmp_path, monkeypatch, no_curves
):
    """--overwrite removed the old run as the new one started: a NaN or a bad image in its first epoch
    left neither. Now the old files wait aside and come back, and the new start-up files go. A start
    killed outright leaves them in .replaced/, which --resume auto's restart keeps aside in turn."""
    a = tmp_path / "a"
    run(micro(tmp_path, "a", epochs=1))
    old = contents(a)
    watch_training_losses(monkeypatch, lambda n, loss: loss * float("nan"))
    with pytest.raises(NonFiniteLossError):
        run(micro(tmp_path, "a", epochs=1, overwrite=True, seed=9))
    assert contents(a) == old and not (a / ".replaced").exists()

    # what a SIGKILL in the new run's first epoch leaves: its start-up files, the old run aside
    (a / ".replaced" / "tb").mkdir(parents=True)
    for name in old:
        (a / name).rename(a / ".replaced" / name)
    (a / "config.yaml").write_text((a / ".replaced" / "config.yaml").read_text())
    with pytest.raises(NonFiniteLossError):  # restarted by --resume auto, it fails again: the old run is back
        run(micro(tmp_path, "a", epochs=1, resume="auto", seed=9))
    assert contents(a) == old and not (a / ".replaced").exists()

    (a / ".replaced").mkdir()  # stale: left beside a run that has a checkpoint
    (a / ".replaced" / "last.pt").write_bytes(b"an older run")
    monkeypatch.setattr(torch.nn.functional, "cross_entropy", REAL_CROSS_ENTROPY)
    run(micro(tmp_path, "a", epochs=1, overwrite=True, seed=9))
    assert not (a / ".replaced").exists() and (a / "last.pt").read_bytes() != old["last.pt"]


def test_a_set_aside_that_fails_midway_puts_back_what_it_moved(tmp_path, monkeypatch):
    """A move failing partway (tb/ on another file system) used to leave files aside, which the failure's
    restore then deleted as the new run's."""
    from cvt.engine import rundir

    fake_run(tmp_path)
    before = contents(tmp_path)
    real_move = rundir._move

    def move(name, source, target):
        if name.startswith("tb/"):
            raise OSError(18, "Invalid cross-device link")
        real_move(name, source, target)

    monkeypatch.setattr(rundir, "_move", move)
    replaced = rundir.ReplacedRun(tmp_path)
    with pytest.raises(CvtError, match="cannot write to the run folder .*Invalid cross-device link"):
        rundir.prepare_run_dir(tmp_path, replaced)
    replaced.restore()
    assert contents(tmp_path) == before and not (tmp_path / ".replaced").exists()


def test_a_run_failing_after_its_first_checkpoint_keeps_its_own_files(tmp_path):
    """Once the new run's first checkpoint discarded the replaced run, a later failure (a NaN in epoch
    2, Ctrl-C) has nothing to give back: the new run's files stay."""
    from cvt.engine import rundir

    fake_run(tmp_path)
    replaced = rundir.ReplacedRun(tmp_path)
    rundir.prepare_run_dir(tmp_path, replaced)
    aside = ("best.pt", "config.yaml", "last.pt", "metrics.csv", "tb/events.out.tfevents.1")
    assert sorted(contents(tmp_path)) == [f".replaced/{name}" for name in aside]
    (tmp_path / "last.pt").write_text("the new run's epoch 1")
    replaced.discard()  # its first checkpoint is saved
    replaced.restore()  # what the failure calls
    assert contents(tmp_path) == {"last.pt": b"the new run's epoch 1"}


def test_metrics_csv_leaves_a_value_an_epoch_did_not_measure_empty(tmp_path):
    """A run without EMA has no ema_top1: its column is empty, not a 0 % that reads as measured."""
    from cvt.engine.rundir import METRIC_COLUMNS, write_metrics

    row = {
        "epoch": 1,
        "train_loss": 2.5,
        "val_loss": 2.25,
        "top1": 12.5,
        "top5": 50.0,
        "lr": 0.001,
        "time": 3.0,
    }
    write_metrics(tmp_path, [row])
    with open(tmp_path / "metrics.csv") as f:
        assert list(csv.reader(f)) == [
            list(METRIC_COLUMNS),
            ["1", "2.5", "2.25", "12.5", "50.0", "0.001", "3.0", ""],
        ]


# ---- 4. and 6. signals


def test_sigterm_saves_last_pt_and_exits_143(tmp_path):
    """A job scheduler's stop (SIGTERM to every process of the job, data-loader workers too, as SLURM
    sends it) saves like Ctrl-C; one line says what was saved."""
    out = tmp_path / "run"
    flags = {**MICRO, "epochs": 3, "save_every_steps": 1, "workers": 2, "output": str(out)}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CI": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "cvt", "train", *as_argv(flags)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 300
    while not (out / "last.pt").exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGTERM)  # the training process and its workers
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    last = err.strip().splitlines()[-1]
    assert (
        last.startswith(f"cvt train: interrupted: saved {out / 'last.pt'} at step ") and "(SIGTERM)" in last
    )
    assert "--resume auto" in last and "Traceback" not in err
    assert 0 < torch.load(out / "last.pt", weights_only=True)["step"] < 12
    assert not (out / ".lock").exists()


def test_ctrl_c_during_validation_stops_after_the_epochs_saves(tmp_path, monkeypatch, capfd, no_curves):
    """Said at once; the epoch's validation and saves complete, and the run stops there (even after
    its last epoch: summary.json is left to --resume auto, which trains nothing more)."""
    from cvt.engine import evaluate as evaluate_module

    real = evaluate_module.evaluate

    def interrupted_evaluate(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluate_module, "evaluate", interrupted_evaluate)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt, match=r"saved .*last\.pt at the end of epoch 1 \(SIGINT\)") as info:
        run(micro(tmp_path, epochs=1))
    from cvt.engine.trainer import TrainingInterrupted

    assert isinstance(info.value, TrainingInterrupted) and info.value.signum == signal.SIGINT
    assert "SIGINT: stopping after this validation" in capfd.readouterr().err
    assert (
        torch.load(out / "last.pt", weights_only=True)["epoch"] == 1 and not (out / "summary.json").exists()
    )

    monkeypatch.setattr(evaluate_module, "evaluate", real)
    assert run(micro(tmp_path, epochs=1, resume="auto"))["steps"] == 4


def test_a_second_signal_stops_at_once_and_threads_keep_their_handlers():
    from cvt.engine.trainer import TrainingInterrupted, _InterruptFlag

    before = [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)]
    with _InterruptFlag(announce=False) as flag:
        flag._handle(signal.SIGTERM, None)
        assert flag.raised and flag.name == "SIGTERM"
        with pytest.raises(TrainingInterrupted, match="second SIGHUP, without saving"):
            flag._handle(signal.SIGHUP, None)
    assert [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)] == before

    errors = []

    def in_a_thread():  # signal handlers can only be set in the main thread
        try:
            with _InterruptFlag():
                pass
        except Exception as err:
            errors.append(err)

    thread = threading.Thread(target=in_a_thread)
    thread.start()
    thread.join()
    assert errors == []


@pytest.mark.parametrize(
    ("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGHUP, 129)]
)
def test_the_cli_exits_128_plus_the_signal_with_one_line(signum, code, monkeypatch, capsys):
    from cvt.engine.trainer import TrainingInterrupted

    said = "saved r/last.pt at step 3 (epoch 1) (X); continue with --resume auto"

    def stopped(args):
        raise TrainingInterrupted(said, signum)

    monkeypatch.setattr("cvt.cli.models.run_list", stopped)
    assert main(["list"]) == code
    assert capsys.readouterr().err == f"cvt list: interrupted: {said}\n"


def test_a_hang_up_still_exits_129_when_the_terminal_is_gone(monkeypatch):
    """After SIGHUP, writing to the closed terminal fails (EIO): the exit code must still say why."""
    import io

    from cvt.engine.trainer import TrainingInterrupted

    class GoneTerminal(io.StringIO):
        def write(self, text):
            raise OSError(5, "Input/output error")

    def stopped(args):
        raise TrainingInterrupted("saved r/last.pt", signal.SIGHUP)

    monkeypatch.setattr("cvt.cli.models.run_list", stopped)
    monkeypatch.setattr(sys, "stderr", GoneTerminal())
    assert main(["list"]) == 128 + signal.SIGHUP


def test_a_moved_run_folder_leaves_the_new_runs_lock_alone(tmp_path):
    """Run A's folder is moved away during A; run B starts at the old path: A's end must not remove
    B's .lock (a third run would get in beside B) nor B's folder."""
    from cvt.engine.rundir import LOCK_FILE, lock_run_dir

    run_dir = tmp_path / "runs" / "x"
    run_a, run_b = lock_run_dir(run_dir, "a"), lock_run_dir(run_dir, "b")
    run_a.__enter__()
    (tmp_path / "runs").rename(tmp_path / "moved")
    run_b.__enter__()
    run_a.__exit__(None, None, None)  # A ends while B runs at the old path
    assert (run_dir / LOCK_FILE).read_text().split()[1] == "b"
    with pytest.raises(UsageError, match=r"in use by another b \(pid"), lock_run_dir(run_dir, "c"):
        pass
    run_b.__exit__(None, None, None)
    assert not (run_dir / LOCK_FILE).exists()  # (the moved folder keeps A's unlocked .lock: no content)


def test_an_output_under_a_file_is_refused_before_a_resume_checkpoint_is_read(tmp_path, monkeypatch, capsys):
    from cvt.engine import resume

    (tmp_path / "afile").write_text("mine")
    read = []
    monkeypatch.setattr(resume, "load_train_checkpoint", lambda path: read.append(path))
    (tmp_path / "last.pt").write_bytes(b"x")
    argv = ["train", "--resume", str(tmp_path / "last.pt"), "--output", str(tmp_path / "afile" / "sub")]
    assert main(argv) == 2
    assert "afile is a file" in capsys.readouterr().err and not read


# ---- 5. an interrupted ablation continues


ABLATE = ["ablate", "--family", "kv_stride", *as_argv({**MICRO, "epochs": 2})]


def test_an_interrupted_ablation_continues_with_resume_auto(tmp_path, monkeypatch, capsys, no_curves):
    """Ctrl-C in the second variant, then `--resume auto`: the first (finished) is kept as it is, the
    second continues from its last.pt, and the report covers both."""
    from cvt.engine import evaluate as evaluate_module

    real, calls = evaluate_module.evaluate, []

    def evaluate(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # the second variant's first validation
            os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluate_module, "evaluate", evaluate)
    out = tmp_path / "ab"
    first, second = out / "kv_stride-stride_1", out / "kv_stride-stride_2"
    assert main([*ABLATE, "--output", str(out)]) == 130
    err = capsys.readouterr().err
    said = (
        f"interrupted: saved {second / 'last.pt'} at the end of epoch 1 (SIGINT); continue with --resume auto"
    )
    assert said in err
    kept = (first / "last.pt").read_bytes()

    assert main([*ABLATE, "--output", str(out), "--epochs", "3", "--resume", "auto"]) == 2
    assert "kv_stride-stride_1 was trained with epochs 2 (now 3)" in capsys.readouterr().err

    # the class count and input size record resolved values: unset options are compared as resolved
    for changed in (["--img-size", "32"], ["--num-classes", "12"]):
        assert main([*ABLATE, "--output", str(out), *changed, "--resume", "auto"]) == 2
        said = capsys.readouterr().err
        assert (
            "img_size 16 (now 32)" in said if "--img-size" in changed else "num_classes 10 (now 12)" in said
        )

    assert main([*ABLATE, "--output", str(out), "--resume", "auto"]) == 0
    assert (first / "last.pt").read_bytes() == kept  # not trained again
    assert torch.load(second / "last.pt", weights_only=True)["epoch"] == 2
    assert len(calls) == 4  # the second variant's epoch 2 only
    with open(out / "ablation.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["variant"] for r in rows] == ["stride 1", "stride 2"]
    for row, folder in zip(rows, (first, second), strict=True):
        summary = json.loads((folder / "summary.json").read_text())
        assert float(row["top1"]) == pytest.approx(summary["final_top1"])


def test_ablate_resume_takes_auto_only(tmp_path, capsys):
    assert main([*ABLATE, "--output", str(tmp_path / "ab"), "--resume", "x/last.pt"]) == 2
    assert "cvt ablate --resume takes auto only" in capsys.readouterr().err
    assert not (tmp_path / "ab").exists()


# ---- 7. and 8. refused before any work, in one line


def test_an_output_under_a_file_is_refused_before_the_data_is_read(tmp_path, monkeypatch):
    (tmp_path / "afile").write_text("mine")
    monkeypatch.setattr("cvt.data.build_dataset", lambda *a, **k: pytest.fail("data read first"))
    with pytest.raises(UsageError, match=r"afile is a file, not a folder"):
        run(micro(tmp_path, "afile/sub"))
    assert (tmp_path / "afile").read_text() == "mine"


@pytest.mark.parametrize(
    ("change", "said"),
    [
        ({"num_classes": 12}, "num_classes 10 (this command: 12)"),
        (  # the model_args make both the same shape: the class count is what does not fit
            {"model": "cvt_13_cifar", "num_classes": 12},
            "model 'cvt_tiny' (this command: 'cvt_13_cifar'); num_classes 10 (this command: 12)",
        ),
        ({"model_args": {**MICRO["model_args"], "embed_dim": [8, 16, 48]}}, "'embed_dim': [8, 16, 48]"),
    ],
)
def test_a_checkpoint_that_does_not_fit_names_what_differs_in_one_line(tmp_path, change, said, no_curves):
    run(micro(tmp_path, "a", epochs=1))
    with pytest.raises(CheckpointError) as info:
        run({"resume": str(tmp_path / "a" / "last.pt"), "output": str(tmp_path / "b"), **change})
    message = str(info.value)
    assert said in message and "\n" not in message and "--finetune" in message
    assert not (tmp_path / "b").exists()
