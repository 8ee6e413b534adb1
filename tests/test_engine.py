"""The training engine on a micro CvT and a slice of the digits: run folder, checkpoints, faults."""

from __future__ import annotations

import csv
import json
import math
import os
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from conftest import MICRO_MODEL_ARGS
from cvt.engine import NonFiniteLossError, resolve_config, resolve_run, train
from cvt.engine import evaluate as engine_evaluate
from cvt.engine.optim import build_optimizer, build_scheduler, effective_lr, param_groups
from cvt.engine.resume import resumed_position
from cvt.engine.rundir import METRIC_COLUMNS
from cvt.engine.sampler import ResumableSampler
from cvt.engine.state import atomic_torch_save
from cvt.engine.trainer import apply_gradients
from cvt.errors import CheckpointError, DataError, UsageError
from cvt.models import CvT, create_model

# A 3-stage CvT of a few thousand parameters at 16x16: 4 steps per epoch on 64 digits in ~1 s
MICRO = dict(
    img_size=16, train_subset=64, batch_size=16, epochs=2, warmup_epochs=0.5, lr=3e-3, seed=3,
    model_args=MICRO_MODEL_ARGS,
)  # fmt: skip


def micro(tmp_path, name="run", **extra):
    """Flags of a micro run writing into ``tmp_path/name``."""
    return {**MICRO, "output": str(tmp_path / name), **extra}


def run(flags, config=None):
    cfg, ckpt = resolve_run(str(config) if config else None, flags)
    return train(cfg, ckpt)


def weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def contents(folder):
    """Every file under ``folder`` with its bytes (to show that a refused run touched nothing)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def fake_run(folder):
    """A folder holding the files of some earlier run."""
    (folder / "tb").mkdir(parents=True)
    for name in ("last.pt", "best.pt", "metrics.csv", "config.yaml", "tb/events.out.tfevents.1"):
        (folder / name).write_text(f"earlier {name}")


REAL_CROSS_ENTROPY = F.cross_entropy  # the loss before a test patches it


def watch_training_losses(monkeypatch, change=None) -> list[float]:
    """Patch the loss so that every training batch's (a graph is built; validation runs without) is
    appended to the returned list; ``change(n, loss)``, given, sees the n-th (from 1) first and returns
    the loss training gets."""
    losses: list[float] = []

    def watched(*args, **kwargs):
        loss = REAL_CROSS_ENTROPY(*args, **kwargs)
        if torch.is_grad_enabled():
            loss = change(len(losses) + 1, loss) if change is not None else loss
            losses.append(loss.item())
        return loss

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", watched)
    return losses


@pytest.fixture
def no_curves(monkeypatch):
    """Skip drawing curves.png (half the time of a micro epoch) in tests about other files."""
    monkeypatch.setattr("cvt.engine.trainer.plot_curves", lambda run_dir, history, topk=5: None)


def test_run_folder_has_every_file_with_sane_contents(tmp_path, capsys):
    from cvt.cli.main import main

    summary = run(micro(tmp_path))
    out = tmp_path / "run"
    names = {p.name for p in out.iterdir()}
    assert {"config.yaml", "metrics.csv", "curves.png", "last.pt", "best.pt", "summary.json", "tb"} <= names
    assert not [n for n in names if n.endswith(".tmp")]

    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert list(rows[0]) == list(METRIC_COLUMNS)
    for r in rows:
        assert 0 <= float(r["top1"]) <= float(r["top5"]) <= 100
        assert 0 < float(r["train_loss"]) < 5 and 0 < float(r["val_loss"]) < 5
    assert float(rows[1]["train_loss"]) < math.log(10) + 0.1  # not worse than chance
    assert float(rows[-1]["lr"]) == pytest.approx(1e-5)  # cosine ends at min_lr

    saved = json.loads((out / "summary.json").read_text())
    assert saved == summary
    assert saved["epochs"] == 2 and saved["steps"] == 8 and saved["train_seconds"] > 0
    assert saved["final_top1"] == pytest.approx(float(rows[-1]["top1"]))
    assert saved["best_top1"] == pytest.approx(max(float(r["top1"]) for r in rows))
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert any(p.name.startswith("events.out.tfevents") for p in (out / "tb").iterdir())

    # config.yaml holds every resolved option and reruns as a --config recipe
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["num_classes"] == 10 and config["img_size"] == 16 and config["batch_size"] == 16
    assert "overwrite" not in config and "resume" not in config  # how it was started is no option of the run
    assert resolve_config(str(out / "config.yaml"), {}).model_args == MICRO["model_args"]

    # checkpoints load without unpickling code and rebuild the model
    ckpt = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    expected = {
        "model",
        "optimizer",
        "scaler",
        "ema",
        "epoch",
        "step",
        "rng",
        "config",
        "classes",
    }
    assert expected <= set(ckpt)
    assert (ckpt["epoch"], ckpt["step"], ckpt["classes"]) == (2, 8, [str(d) for d in range(10)])
    assert {"model", "num_classes", "img_size"} <= set(ckpt["config"])
    model = create_model("cvt_tiny", num_classes=10, img_size=16, **MICRO["model_args"])
    model.load_state_dict(ckpt["model"])
    best = torch.load(out / "best.pt", map_location="cpu", weights_only=True)
    assert best["history"][-1]["top1"] == pytest.approx(saved["best_top1"])

    # the last epoch's validation figures are those of its model: cvt eval of last.pt gives them again
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(out / "last.pt"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["top1"] == pytest.approx(float(rows[-1]["top1"])) == pytest.approx(saved["final_top1"])
    assert report["top5"] == pytest.approx(float(rows[-1]["top5"])) == pytest.approx(saved["final_top5"])
    assert report["loss"] == pytest.approx(float(rows[-1]["val_loss"]), rel=1e-5)


def test_curves_plot_each_column_of_the_history_under_its_label(tmp_path, monkeypatch):
    from matplotlib.axes import Axes

    from cvt.engine.rundir import plot_curves

    plotted: dict[str, tuple[list, list]] = {}
    real_plot = Axes.plot

    def recording_plot(self, x, y, *args, label=None, **kwargs):
        plotted[label] = (list(x), list(y))
        return real_plot(self, x, y, *args, label=label, **kwargs)

    monkeypatch.setattr(Axes, "plot", recording_plot)
    history = [
        {"epoch": 1, "train_loss": 2.0, "val_loss": 1.5, "top1": 40.0, "top5": 80.0},
        {"epoch": 2, "train_loss": 1.2, "val_loss": 1.1, "top1": 55.0, "top5": 90.0},
    ]
    plot_curves(tmp_path, history)
    assert plotted == {
        "train": ([1, 2], [2.0, 1.2]),
        "val": ([1, 2], [1.5, 1.1]),
        "top-1": ([1, 2], [40.0, 55.0]),
        "top-5": ([1, 2], [80.0, 90.0]),
    }
    plotted.clear()
    plot_curves(tmp_path, history, topk=3)  # 3 classes: the "top5" column is top-3
    assert "top-3" in plotted and "top-5" not in plotted
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_existing_run_folder_is_refused_untouched_then_overwritten(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "last.pt").write_bytes(b"old")
    with pytest.raises(UsageError, match="already has content .*--resume auto.*--overwrite"):
        run(micro(tmp_path))
    assert sorted(p.name for p in out.iterdir()) == ["last.pt", "notes.txt"]
    assert (out / "last.pt").read_bytes() == b"old"

    run(micro(tmp_path, epochs=1, overwrite=True))
    assert (out / "notes.txt").read_text() == "mine"  # --overwrite replaces run files only
    assert weights(out / "last.pt")  # a real checkpoint now
    assert run(micro(tmp_path, epochs=2, resume="auto"))["steps"] == 8  # --overwrite is not inherited


@pytest.mark.parametrize("workers", [0, 2])
def test_mid_epoch_resume_ends_with_the_same_weights(tmp_path, monkeypatch, workers):
    """Resume from a checkpoint saved after step 3 of 8 (mid-epoch 1) equals the uninterrupted run,
    with augmentations drawn in the training process or in worker processes."""
    snapshots = {}

    def save_and_keep(obj, path):
        atomic_torch_save(obj, path)
        if path.name == "last.pt":
            snapshots[obj["step"]] = path.read_bytes()

    monkeypatch.setattr("cvt.engine.trainer.atomic_torch_save", save_and_keep)
    flags = micro(
        tmp_path, deterministic=True, save_every_steps=3, mixup=0.8, random_crop=True, workers=workers
    )
    flags["model_args"] = {**flags["model_args"], "drop_path_rate": 0.2}  # random: RNG must be restored
    flags.update(ema=True, ema_decay=0.5)  # the EMA weights must continue too
    run(flags)
    assert sorted(snapshots) == [3, 4, 6, 8]  # mid-epoch saves at 3 and 6, epoch ends at 4 and 8
    full = weights(tmp_path / "run" / "last.pt")
    full_ema = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["ema"]

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    (resumed / "last.pt").write_bytes(snapshots[3])
    monkeypatch.setattr("cvt.engine.trainer.atomic_torch_save", atomic_torch_save)
    summary = run({"resume": str(resumed / "last.pt")})  # config comes from the checkpoint
    assert summary["steps"] == 8 and summary["run_dir"] == str(resumed)
    assert_same_weights(weights(resumed / "last.pt"), full)
    assert_same_weights(torch.load(resumed / "last.pt", weights_only=True)["ema"], full_ema)
    rows = list(csv.DictReader((resumed / "metrics.csv").open()))
    assert [r["epoch"] for r in rows] == ["1", "2"]


def test_resume_auto_continues_and_extends_a_finished_run(tmp_path):
    run(micro(tmp_path, epochs=1))
    with pytest.raises(
        CheckpointError, match=r"run is a folder, not a last.pt/best.pt file; resume from .*last\.pt"
    ):
        run({"resume": str(tmp_path / "run")})  # the run folder instead of its checkpoint
    wider = {**MICRO["model_args"], "embed_dim": [8, 16, 64]}
    with pytest.raises(CheckpointError, match="does not fit cvt_tiny with 10 classes"):
        run(micro(tmp_path, epochs=2, resume="auto", model_args=wider))
    # torch loads AdamW's moments into SGD (and fails the other way round inside Adam): refused up front
    with pytest.raises(CheckpointError, match=r"trained with optimizer 'adamw' \(this command: 'sgd'\)"):
        run(micro(tmp_path, epochs=2, resume="auto", optimizer="sgd"))
    summary = run(micro(tmp_path, epochs=2, resume="auto"))
    assert summary["steps"] == 8
    rows = list(csv.DictReader((tmp_path / "run" / "metrics.csv").open()))
    assert [r["epoch"] for r in rows] == ["1", "2"]


def test_resume_follows_the_schedule_options_given_on_resume(tmp_path, monkeypatch, no_curves):
    """A 2-epoch run resumed to 4 epochs with another lr and floor steps, at every resumed step, with
    the lr of a fresh 4-epoch run with those options (not the finished 2-epoch schedule's floor)."""
    lrs = {}  # run folder name -> the lr of each optimizer step, in order

    def recording_optimizer(model, cfg, lr):
        optimizer = build_optimizer(model, cfg, lr)
        log = lrs.setdefault(cfg.run_dir.name, [])
        optimizer.register_step_pre_hook(lambda opt, args, kwargs: log.append(opt.param_groups[0]["lr"]))
        return optimizer

    monkeypatch.setattr("cvt.engine.trainer.build_optimizer", recording_optimizer)
    longer = dict(epochs=4, lr=2e-3, min_lr=1e-4)
    run(micro(tmp_path, "resumed", epochs=2, train_subset=32))  # 2 steps per epoch
    run({**longer, "output": str(tmp_path / "resumed"), "resume": "auto"})
    run(micro(tmp_path, "fresh", train_subset=32, **longer))
    assert len(lrs["resumed"]) == len(lrs["fresh"]) == 8
    assert lrs["resumed"][4:] == lrs["fresh"][4:]
    assert lrs["fresh"][4] > 1e-3 and lrs["fresh"][7] > 1e-4  # still on the cosine, above the floor
    config = yaml.safe_load((tmp_path / "resumed" / "config.yaml").read_text())
    assert (config["epochs"], config["lr"], config["min_lr"]) == (4, 2e-3, 1e-4)


def test_resume_takes_the_optimizer_settings_given_on_resume(tmp_path, monkeypatch, no_curves):
    """The checkpoint brings the optimizer's moments; its settings (here weight decay) follow the
    resumed command, as config.yaml says (load_state_dict alone would bring back the old ones)."""
    decays = []
    original = build_optimizer

    def recording_optimizer(model, cfg, lr):
        optimizer = original(model, cfg, lr)
        optimizer.register_step_pre_hook(
            lambda opt, args, kwargs: decays.append(opt.param_groups[0]["weight_decay"])
        )
        return optimizer

    monkeypatch.setattr("cvt.engine.trainer.build_optimizer", recording_optimizer)
    run(micro(tmp_path, epochs=1, weight_decay=0.05, train_subset=32))
    run({"epochs": 2, "weight_decay": 0.5, "output": str(tmp_path / "run"), "resume": "auto"})
    assert decays == [0.05, 0.05, 0.5, 0.5]
    optimizer_state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["optimizer"]
    assert optimizer_state["state"]  # the moments were carried over, not reset


def test_resume_keeps_the_global_batch_and_converts_the_position_to_another_split(
    tmp_path, monkeypatch, no_curves
):
    """The schedule counts steps of the saved global batch: another global batch is refused; the same
    one split otherwise (more accumulation, fewer processes) continues with the samples not yet used."""
    snapshots, order = {}, {}  # step -> last.pt bytes; run folder name -> indices drawn per epoch

    def save_and_keep(obj, path):
        atomic_torch_save(obj, path)
        if path.name == "last.pt":
            snapshots.setdefault(obj["step"], path.read_bytes())

    class RecordingSampler(ResumableSampler):
        def __iter__(self):
            indices = list(super().__iter__())
            order.setdefault(self.run, {})[self.epoch] = indices
            return iter(indices)

    def sampler(*args, **kwargs):
        recording = RecordingSampler(*args, **kwargs)
        recording.run = "resumed" if snapshots else "full"
        return recording

    monkeypatch.setattr("cvt.engine.trainer.atomic_torch_save", save_and_keep)
    monkeypatch.setattr("cvt.engine.trainer.ResumableSampler", sampler)
    run(micro(tmp_path, save_every_steps=3))  # 4 steps of 16 images per epoch; saved at step 3
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    (resumed / "last.pt").write_bytes(snapshots[3])  # 3 batches of epoch 1 done
    with pytest.raises(CheckpointError, match=r"global batch of 16 \(batch size 16 x 1 process\(es\) x 1"):
        run({"resume": str(resumed / "last.pt"), "batch_size": 8})
    summary = run({"resume": str(resumed / "last.pt"), "batch_size": 8, "accum_steps": 2})
    assert summary["steps"] == 8  # the same schedule: 4 steps of 16 images per epoch
    assert order["resumed"][0] == order["full"][0][48:]  # the 16 images epoch 1 had left, no repeats
    assert order["resumed"][1] == order["full"][1]


def test_resume_refuses_other_training_data(tmp_path, monkeypatch, no_curves):
    """The schedule and the position in the epoch count the saved training set: another --train-subset
    is refused mid-epoch (it crashed with "__len__() should return >= 0") and at an epoch end (the
    cosine then never reached its floor); another --seed is refused where it picks the subset."""
    snapshots = {}

    def save_and_keep(obj, path):
        atomic_torch_save(obj, path)
        if path.name == "last.pt":
            snapshots.setdefault(obj["step"], path.read_bytes())

    monkeypatch.setattr("cvt.engine.trainer.atomic_torch_save", save_and_keep)
    run(micro(tmp_path, epochs=1, save_every_steps=3))  # 64 images, 4 steps of 16; saved at steps 3 and 4
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["batch_geometry"]["train_images"] == 64
    middle = tmp_path / "middle"
    middle.mkdir()
    (middle / "last.pt").write_bytes(snapshots[3])
    for flags in ({"train_subset": 32}, {"epochs": 2, "train_subset": 128}):
        with pytest.raises(CheckpointError, match="trained on 64 images an epoch, this run has (32|128)"):
            run({"resume": str(middle / "last.pt"), **flags})
    with pytest.raises(CheckpointError, match="trained on 64 images an epoch, this run has 128"):
        run({"resume": "auto", "output": str(tmp_path / "run"), "epochs": 2, "train_subset": 128})
    with pytest.raises(CheckpointError, match="--seed 3, this run has 4, which chooses the --train-subset"):
        run({"resume": "auto", "output": str(tmp_path / "run"), "epochs": 2, "seed": 4})
    summary = run({"resume": "auto", "output": str(tmp_path / "run"), "epochs": 2})
    assert summary["steps"] == 8


def test_resume_checks_the_flags_on_the_runs_own_options(tmp_path, no_curves):
    """--lr below the default min_lr (1e-5) for a run whose floor is 0: the flags are checked on the
    checkpoint's config, not on the defaults (where they named a cosine floor the run does not have)."""
    run(micro(tmp_path, epochs=1, sched="step", min_lr=0.0))
    summary = run(
        {"resume": "auto", "output": str(tmp_path / "run"), "epochs": 2, "lr": 5e-6, "warmup_lr": 1e-6}
    )
    assert summary["steps"] == 8
    with pytest.raises(UsageError, match="'min_lr'"):  # still checked, on the run's own options
        run(
            {
                "resume": "auto",
                "output": str(tmp_path / "run"),
                "epochs": 3,
                "sched": "cosine",
                "min_lr": 1e-3,
            }
        )


def test_an_extended_run_drops_its_summary_until_it_finishes_again(tmp_path, monkeypatch, no_curves):
    """summary.json says a run finished: resumed with more epochs and stopped, it held the old
    run's outcome (2 epochs, step 8) beside a config.yaml of 3 epochs and a last.pt at step 10."""
    run(micro(tmp_path, epochs=1))
    summary_path = tmp_path / "run" / "summary.json"
    assert json.loads(summary_path.read_text())["epochs"] == 1

    def stop_in_the_second_epoch(run_state, epoch, *args):
        raise KeyboardInterrupt

    monkeypatch.setattr("cvt.engine.trainer._train_epoch", stop_in_the_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        run({"resume": "auto", "output": str(tmp_path / "run"), "epochs": 2})
    assert not summary_path.exists()
    monkeypatch.undo()
    summary = run({"resume": "auto", "output": str(tmp_path / "run"), "epochs": 2})
    assert json.loads(summary_path.read_text()) == json.loads(json.dumps(summary))
    assert summary["epochs"] == 2 and summary["topk"] == 5


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (
            {"epochs": 1, "warmup_epochs": 2.0},
            "--warmup-epochs 2 is not shorter than --epochs 1: the lr never reaches",
        ),
        (
            {"sched": "multistep", "decay_milestones": [1, 2, 5]},
            "--decay-milestones 2, 5 at or after --epochs 2",
        ),
        (
            {"sched": "step", "decay_epochs": 3},
            "--decay-epochs 3 at or after --epochs 2: the lr never decays",
        ),
        (
            {"sched": "step", "decay_epochs": 1, "decay_milestones": [1]},
            "--decay-milestones set, but --sched step",
        ),
        ({"decay_rate": 0.5}, "--decay-rate set, but --sched cosine does not read them: ignored"),
    ],
)
def test_schedule_settings_that_do_nothing_are_warned(tmp_path, no_curves, flags, message):
    with pytest.warns(UserWarning, match=re.escape(message)):
        run(micro(tmp_path, **flags))


def test_resumed_position_counts_the_batches_of_every_saved_process() -> None:
    """3 batches of 8 done by each of 2 processes are 48 images: 6 batches of 8 for one process that
    accumulates 2 (the same global batch of 16); a geometry-less checkpoint keeps its count."""
    saved = {"batch_geometry": {"batch_size": 8, "world_size": 2, "accum_steps": 1}}
    one_process = resolve_config(None, {"batch_size": 8, "accum_steps": 2})
    assert resumed_position(saved, 3, one_process, world_size=1) == 6
    four = resolve_config(None, {"batch_size": 4, "accum_steps": 1})
    assert resumed_position(saved, 3, four, world_size=4) == 3  # 3 rounds of 4 images on 4 processes
    assert resumed_position({}, 3, one_process, world_size=1) == 3


def test_resume_reads_neither_the_finetune_file_nor_the_published_weights(tmp_path, monkeypatch, no_curves):
    """The checkpoint holds every weight; the file or hub weights a run started from may be gone."""
    run(micro(tmp_path, "source", epochs=1))
    start = tmp_path / "start.pt"
    (tmp_path / "source" / "last.pt").rename(start)
    asked = []

    def offline_create_model(name, pretrained=False, **kwargs):  # no hub here: record what was asked
        asked.append(pretrained)
        return create_model(name, **kwargs)

    monkeypatch.setattr("cvt.models.create_model", offline_create_model)
    run(micro(tmp_path, epochs=1, finetune=str(start), pretrained=True))
    start.unlink()  # moved away after the run started from it
    summary = run({"epochs": 2, "output": str(tmp_path / "run"), "resume": "auto"})
    assert summary["steps"] == 8
    assert asked == [True, False]


def test_resume_into_a_new_folder_takes_best_pt_along(tmp_path, no_curves):
    """The new folder's best.pt and summary keep meaning the best epoch so far: the source run's
    best.pt comes along; without it the best is counted from the epochs trained there (warned)."""
    run(micro(tmp_path, "a", epochs=1))
    summary = run({"resume": str(tmp_path / "a" / "last.pt"), "output": str(tmp_path / "b")})  # no epoch left
    assert (tmp_path / "b" / "best.pt").read_bytes() == (tmp_path / "a" / "best.pt").read_bytes()
    assert summary["best_epoch"] == 1

    (tmp_path / "a" / "best.pt").write_bytes(b"not a checkpoint")  # unreadable: as good as none
    with pytest.warns(UserWarning, match="no best.pt of the best epoch so far"):
        run({"resume": str(tmp_path / "a" / "last.pt"), "output": str(tmp_path / "d")})
    (tmp_path / "a" / "best.pt").unlink()  # only last.pt was kept
    with pytest.warns(UserWarning, match="no best.pt of the best epoch so far .* from here on"):
        summary = run({"resume": str(tmp_path / "a" / "last.pt"), "output": str(tmp_path / "c"), "epochs": 2})
    assert summary["best_epoch"] == 2
    best = torch.load(tmp_path / "c" / "best.pt", weights_only=True)
    assert (best["epoch"], best["best_top1"]) == (2, summary["best_top1"])


def damaged_checkpoints(good: bytes) -> dict[str, bytes]:
    """A best.pt as a crash or a full disk leaves it: cut short, or with bytes of its pickle overwritten."""
    pickle_at = good.index(b"data.pkl") + 64  # inside the zip's first record: the pickle itself
    overwritten = good[:pickle_at] + b"\xff" * 32 + good[pickle_at + 32 :]
    return {"not a checkpoint": b"not a checkpoint", "empty": b"", "truncated": good[: len(good) // 2],
            "overwritten": overwritten}  # fmt: skip


def carry_best_setup(tmp_path):
    """A source run whose best.pt records top-1 50, a new run folder, and that run's progress."""
    source, target = tmp_path / "a", tmp_path / "b"
    source.mkdir()
    target.mkdir()
    atomic_torch_save({"best_top1": 50.0, "model": {"w": torch.ones(3)}}, source / "best.pt")
    return source, target, {"best_top1": 50.0, "best_epoch": 3}


def test_carry_best_warns_about_a_damaged_best_pt(tmp_path):
    from cvt.engine.resume import carry_best

    source, target, _ = carry_best_setup(tmp_path)
    good = (source / "best.pt").read_bytes()
    for name, data in damaged_checkpoints(good).items():
        (source / "best.pt").write_bytes(data)
        progress = {"best_top1": 50.0, "best_epoch": 3}
        with pytest.warns(UserWarning, match="no best.pt of the best epoch so far"):
            carry_best(source / "last.pt", target, progress)
        assert progress == {"best_top1": -1.0, "best_epoch": 0}, name
        assert not (target / "best.pt").exists()


@pytest.mark.parametrize(
    "error",
    [torch.OutOfMemoryError("CUDA out of memory"), RuntimeError("DefaultCPUAllocator: can't allocate memory"),
     MemoryError(), TypeError("a bug")],
)  # fmt: skip
def test_carry_best_lets_errors_other_than_a_damaged_file_through(tmp_path, monkeypatch, error):
    """Running out of memory, or a bug, is not turned into "no best.pt": the best would be reset."""
    from cvt.engine.resume import carry_best

    source, target, progress = carry_best_setup(tmp_path)

    def failing_load(*args, **kwargs):
        raise error

    monkeypatch.setattr(torch, "load", failing_load)
    with pytest.raises(type(error)):
        carry_best(source / "last.pt", target, progress)
    assert progress == {"best_top1": 50.0, "best_epoch": 3}


def test_loaders_pin_memory_only_for_a_gpu_device(tmp_path, monkeypatch, no_curves):
    """Training on the CPU of a machine with a GPU: neither loader pins its batches (the validation
    loader did, as a GPU was there)."""
    from cvt.engine import evaluate as evaluate_module

    pinned = []

    class Stop(Exception):
        pass

    def recording_evaluate(model, loader, *args, **kwargs):
        pinned.append(loader.pin_memory)
        raise Stop  # before the loader is read: there is no GPU to pin for here

    def no_batches(loader, rng_state):  # the training loader, not read: straight to validation
        pinned.append(loader.pin_memory)
        return iter(())

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(evaluate_module, "evaluate", recording_evaluate)
    monkeypatch.setattr("cvt.engine.trainer._epoch_batches", no_batches)
    with pytest.raises(Stop):
        run(micro(tmp_path, device="cpu", epochs=1))
    assert pinned == [False, False]  # training, validation


def test_an_ema_added_on_resume_starts_from_the_resumed_weights(tmp_path, no_curves):
    """decay 1 freezes the EMA where it started: at the epoch-1 weights, not at a fresh initialisation."""
    run(micro(tmp_path, epochs=1))
    trained = weights(tmp_path / "run" / "last.pt")
    run({"epochs": 2, "ema": True, "ema_decay": 1.0, "output": str(tmp_path / "run"), "resume": "auto"})
    ema = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["ema"]
    assert ema.keys() == trained.keys()
    for key, value in trained.items():
        if value.is_floating_point():
            assert torch.equal(ema[key], value), key


def test_tensorboard_keeps_one_point_per_epoch_across_resumes(tmp_path, no_curves):
    """A resume keeps the checkpoint's own epoch-end scalars and drops only what the stopped run
    logged after it: here epoch 2 is logged, its last.pt lost, and the run resumed from epoch 1."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    run(micro(tmp_path, epochs=1))
    epoch_one = (out / "last.pt").read_bytes()
    run({"epochs": 2, "output": str(out), "resume": "auto"})
    (out / "last.pt").write_bytes(epoch_one)
    run({"epochs": 3, "output": str(out), "resume": "auto"})
    events = EventAccumulator(str(out / "tb"))
    events.Reload()
    assert [e.step for e in events.Scalars("val/top1")] == [4, 8, 12]  # as an uninterrupted run
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert [e.value for e in events.Scalars("val/top1")] == pytest.approx([float(r["top1"]) for r in rows])


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"model": "cvt_99"}, "unknown model"),
        ({"num_classes": 5}, "smaller than the data set's 10 classes"),
        ({"batch_size": 128}, "larger than the training set"),
        ({"batch_size": 15, "mixup": 0.8}, "even batch size"),
    ],
)
def test_overwrite_keeps_the_old_run_when_the_options_are_refused(tmp_path, bad, message):
    out = tmp_path / "run"
    fake_run(out)
    before = contents(out)
    with pytest.raises(UsageError, match=message):
        run(micro(tmp_path, overwrite=True, **bad))
    assert contents(out) == before


def test_resume_never_writes_over_another_run(tmp_path, no_curves):
    run(micro(tmp_path, "a", epochs=1))
    other = tmp_path / "b"
    fake_run(other)
    before = contents(other)
    with pytest.raises(
        UsageError, match=r"content .* of another run than .*a/last\.pt.* empty or new --output"
    ):
        run({"resume": str(tmp_path / "a" / "last.pt"), "output": str(other), "epochs": 2})
    assert contents(other) == before

    (other / "last.pt").unlink()  # files of a run, but nothing for --resume auto to continue
    before = contents(other)
    with pytest.raises(UsageError, match="has no last.pt to resume; pass --overwrite"):
        run(micro(tmp_path, "b", resume="auto"))
    assert contents(other) == before

    # into a new folder, another run's checkpoint does continue
    summary = run({"resume": str(tmp_path / "a" / "last.pt"), "output": str(tmp_path / "c"), "epochs": 2})
    assert summary["steps"] == 8
    assert torch.load(tmp_path / "a" / "last.pt", weights_only=True)["epoch"] == 1  # a itself is untouched


def test_resume_auto_restarts_a_run_killed_before_its_first_checkpoint(tmp_path, no_curves):
    """A job that always runs `--resume auto`: killed in epoch 1 it left config.yaml and tb/ only, and
    the same command must start it again (its start-up files replaced), not refuse for want of last.pt."""
    run(micro(tmp_path, "killed", epochs=1))
    killed = tmp_path / "killed"
    for name in ("last.pt", "best.pt", "metrics.csv", "summary.json"):
        (killed / name).unlink()  # what a SIGKILL before the first save leaves: config.yaml and tb/
    assert sorted(p.name for p in killed.iterdir()) == ["config.yaml", "tb"]
    # the same command without --resume is refused, and told what restarts it
    with pytest.raises(UsageError, match="before its first checkpoint: pass --resume auto to restart it"):
        run(micro(tmp_path, "killed", epochs=1))
    summary = run(micro(tmp_path, "killed", epochs=1, resume="auto"))
    assert summary["epochs"] == 1 and (killed / "last.pt").is_file()
    events = list((killed / "tb").rglob("events.out.tfevents*"))
    assert len(events) == 1  # the killed attempt's events were replaced, not mixed in


def test_resume_auto_continues_a_run_killed_between_its_first_two_saves(tmp_path, no_curves):
    """The end of epoch 1 writes best.pt, then last.pt: killed in between, the folder holds config.yaml,
    tb/ and best.pt, which has the state last.pt would have had; --resume auto continues from it."""
    for name in ("whole", "cut"):
        run(micro(tmp_path, name, epochs=1))
    cut = tmp_path / "cut"
    for name in ("last.pt", "metrics.csv", "summary.json"):
        (cut / name).unlink()
    for name in ("whole", "cut"):  # resumed from last.pt, and from the cut run's best.pt
        run(micro(tmp_path, name, epochs=2, resume="auto"))
    assert_same_weights(weights(cut / "last.pt"), weights(tmp_path / "whole" / "last.pt"))
    assert torch.load(cut / "last.pt", weights_only=True)["epoch"] == 2


@pytest.mark.parametrize("made", ["events", "recipe"])
def test_resume_auto_never_restarts_over_what_a_user_made(tmp_path, no_curves, made):
    """Only a config.yaml recorded by a run (with its tb/) counts as a run killed before its first
    checkpoint: a user's own TensorBoard events or hand-written recipe in the folder are refused."""
    out = tmp_path / "run"
    if made == "events":
        (out / "tb").mkdir(parents=True)
        (out / "tb" / "events.out.tfevents.1.mine").write_text("precious")
    else:
        out.mkdir()
        (out / "config.yaml").write_text("# my recipe\nlr: 0.1\n")
    before = contents(out)
    with pytest.raises(UsageError, match="already has content"):
        run(micro(tmp_path, "run", resume="auto"))
    assert contents(out) == before


def test_a_reused_config_yaml_never_replaces_or_mixes_runs(tmp_path, no_curves):
    """config.yaml records the run's options, not how it was started (--overwrite, --resume)."""
    out = tmp_path / "run"
    fake_run(out)
    run(micro(tmp_path, epochs=1, overwrite=True))
    before = contents(out)
    with pytest.raises(UsageError, match="already has content"):
        run({}, config=out / "config.yaml")  # not a second --overwrite
    assert contents(out) == before

    run({"epochs": 2, "output": str(out), "resume": "auto"})
    saved = torch.load(out / "last.pt", weights_only=True)["config"]
    for recorded in (yaml.safe_load((out / "config.yaml").read_text()), saved):
        assert not {"overwrite", "resume"} & set(recorded)
    summary = run({"overwrite": True}, config=out / "config.yaml")  # no clash with the resume
    assert summary["steps"] == 8 and len(list((out / "tb").iterdir())) == 1  # a new run, old events gone


def write_image_folder(root, train_classes, val_classes):
    """``root/train/<class>/`` with 8 and ``root/val/<class>/`` with 2 random 20x20 images each."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, classes, count in (("train", train_classes, 8), ("val", val_classes, 2)):
        for name in classes:
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")


def test_imagefolder_validation_uses_the_training_class_indices(tmp_path, monkeypatch, capsys, no_curves):
    """val/ without the first training class keeps the training labels (the model is validated on
    what it learned); a val/ class unknown to training is refused before anything is written."""
    from cvt.engine import evaluate as evaluate_module

    seen = []

    def recording_evaluate(model, loader, *args, **kwargs):
        seen.append((list(loader.dataset.classes), list(loader.dataset.targets)))
        return real_evaluate(model, loader, *args, **kwargs)

    real_evaluate = evaluate_module.evaluate
    monkeypatch.setattr(evaluate_module, "evaluate", recording_evaluate)
    data = dict(dataset="imagefolder", train_subset=None, batch_size=8, epochs=1)
    write_image_folder(tmp_path / "missing", ["ant", "bee", "cat"], ["bee", "cat"])
    run(micro(tmp_path, data_dir=str(tmp_path / "missing"), **data))
    assert seen == [(["ant", "bee", "cat"], [1, 1, 2, 2])]  # bee and cat keep their training indices
    # 3 classes: the epoch line names the "top5" column's k
    epoch_line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch 1/1"))
    assert " top3 100.00 " in epoch_line and "top5" not in epoch_line

    write_image_folder(tmp_path / "extra", ["ant", "bee", "cat"], ["ant", "dog"])
    with pytest.raises(DataError, match=r"extra/val has class folder\(s\) dog"):
        run(micro(tmp_path, "refused", data_dir=str(tmp_path / "extra"), **data))
    assert not (tmp_path / "refused").exists()  # refused before training, nothing written


def test_an_unreadable_validation_image_is_left_out_not_replaced(tmp_path, monkeypatch, no_curves):
    """With --skip-bad-images, training validated on the next image in place of a truncated one, with
    that image's label: 6 samples of 5 readable images, and a top-1 cvt eval did not reproduce."""
    from cvt.engine import evaluate as evaluate_module

    results = []

    def recording_evaluate(*args, **kwargs):
        results.append(real_evaluate(*args, **kwargs))
        return results[-1]

    real_evaluate = evaluate_module.evaluate
    monkeypatch.setattr(evaluate_module, "evaluate", recording_evaluate)
    root = tmp_path / "data"
    write_image_folder(root, ["ant", "bee", "cat"], ["ant", "bee", "cat"])  # 2 validation images each
    truncated = root / "val" / "ant" / "1.png"
    truncated.write_bytes(truncated.read_bytes()[:-300])  # its header reads, its pixels do not
    data = dict(dataset="imagefolder", data_dir=str(root), train_subset=None, batch_size=8, epochs=1)
    with pytest.warns(UserWarning, match=r"ant/1\.png: .*left out"):
        run(micro(tmp_path, skip_bad_images=True, **data))
    assert [r.num_samples for r in results] == [5]


def test_resume_on_other_classes_is_refused(tmp_path, no_curves):
    """Same class count, other names: resuming would silently change what each output means."""
    data = dict(dataset="imagefolder", data_dir=str(tmp_path / "data"), train_subset=None, batch_size=8)
    write_image_folder(tmp_path / "data", ["bird", "cat", "dog"], ["bird", "cat", "dog"])
    run(micro(tmp_path, epochs=1, **data))
    before = (tmp_path / "run" / "last.pt").read_bytes()
    for split in ("train", "val"):
        (tmp_path / "data" / split / "bird").rename(tmp_path / "data" / split / "zebra")
    with pytest.raises(
        CheckpointError, match=r"other classes than imagefolder has now: class 0 was 'bird', is 'cat'"
    ):
        run(micro(tmp_path, epochs=2, resume="auto", **data))
    assert (tmp_path / "run" / "last.pt").read_bytes() == before


def test_non_finite_loss_stops_naming_the_step_or_is_skipped(tmp_path, monkeypatch):
    def nan_at_third_batch(n, loss):
        return loss * float("nan") if n == 3 else loss

    watch_training_losses(monkeypatch, nan_at_third_batch)
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss \(nan\) at step 2 \(epoch 1, batch 2\)"):
        run(micro(tmp_path, "stop", epochs=1))
    assert not (tmp_path / "stop" / "last.pt").exists()  # nothing trained on NaN is saved

    losses = watch_training_losses(monkeypatch, nan_at_third_batch)
    summary = run(micro(tmp_path, "skip", epochs=1, skip_nonfinite=True))
    assert summary["skipped_steps"] == 1 and summary["steps"] == 4
    state = torch.load(tmp_path / "skip" / "last.pt", weights_only=True)
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())
    # the epoch's train_loss averages the three finite batches, not the skipped one
    (row,) = csv.DictReader((tmp_path / "skip" / "metrics.csv").open())
    finite_losses = [loss for loss in losses if math.isfinite(loss)]
    assert len(losses) == 4 and len(finite_losses) == 3
    assert float(row["train_loss"]) == pytest.approx(sum(finite_losses) / 3, rel=1e-5)


def test_ctrl_c_mid_epoch_saves_last_pt_at_that_step(tmp_path, monkeypatch, no_curves):
    """Without --save-every-steps too: the step in progress finishes, last.pt is saved at it, and
    TrainingInterrupted says so."""
    import signal

    from cvt.engine.trainer import TrainingInterrupted

    def ctrl_c_during_the_second_batch(n, loss):
        if n == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return loss

    losses = watch_training_losses(monkeypatch, ctrl_c_during_the_second_batch)
    with pytest.raises(TrainingInterrupted, match="at step 2 "):
        run(micro(tmp_path, epochs=1))
    assert len(losses) == 2
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["step"] == 2


def test_a_skipped_step_leaves_no_trace_in_batchnorm_statistics(tmp_path, monkeypatch):
    """A NaN image makes a NaN loss, but its forward has already moved BatchNorm's running statistics;
    --skip-nonfinite puts them back (they used to stay NaN: every later validation was NaN, at chance)."""
    from cvt.engine import trainer

    real_batches = trainer._epoch_batches

    def nan_image_in_third_batch(loader, rng_state):
        for i, (images, targets) in enumerate(real_batches(loader, rng_state)):
            if i == 2:
                images = images.clone()
                images[0] = float("nan")
            yield images, targets

    monkeypatch.setattr(trainer, "_epoch_batches", nan_image_in_third_batch)
    summary = run(micro(tmp_path, "skip", epochs=1, skip_nonfinite=True))
    assert summary["skipped_steps"] == 1 and summary["steps"] == 4
    state = torch.load(tmp_path / "skip" / "last.pt", weights_only=True)
    stats = {k: t for k, t in state["model"].items() if "running_" in k}
    assert stats and all(torch.isfinite(t).all() for t in stats.values())
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())
    # three forwards counted, not four: the skipped one is undone, count included
    tracked = {int(t) for k, t in state["model"].items() if k.endswith("num_batches_tracked")}
    assert tracked == {3}
    with (tmp_path / "skip" / "metrics.csv").open() as f:
        assert math.isfinite(float(list(csv.DictReader(f))[-1]["val_loss"]))


def test_a_cosine_floor_above_the_scaled_peak_is_refused_before_anything_is_written(tmp_path):
    # lr 1e-3 for a global batch of 256 is a peak of 6.25e-5 at batch 16: below the floor 1e-4
    flags = micro(tmp_path, lr=1e-3, lr_base_batch=256, min_lr=1e-4)
    with pytest.raises(
        UsageError, match=r"'min_lr' 0.0001 is above the peak lr 6.25e-05 \(lr 0.001 x global batch 16"
    ):
        run(flags)
    assert not (tmp_path / "run").exists()


def test_a_warm_up_starting_above_the_scaled_peak_is_refused(tmp_path):
    """The shipped 384 fine-tuning recipes kept warmup_lr 1e-5 with a peak of 6.25e-6 on one GPU: the
    warm-up ran downhill from 1.6x the peak, with no message."""
    flags = micro(tmp_path, lr=1e-4, lr_base_batch=256, warmup_lr=1e-5, min_lr=1e-6)  # peak 6.25e-6
    with pytest.raises(UsageError, match=r"'warmup_lr' 1e-05 is above the peak lr 6.25e-06 .* downhill"):
        run(flags)
    assert not (tmp_path / "run").exists()
    assert run({**flags, "warmup_epochs": 0})["steps"] == 8


def test_fp16_grad_scaler_update_clips_the_true_gradients_and_skips_overflows():
    """Under fp16's grad scaler the update unscales before clipping: the optimizer sees gradients of
    norm --clip-grad, not --clip-grad / scale, and steps by them; an overflowed step is skipped and the
    scale backs off. (A CPU GradScaler stands in for the CUDA one that fp16 training uses.)"""
    torch.manual_seed(0)
    model = nn.Linear(8, 4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    scaler.scale(model(torch.randn(16, 8)).pow(2).sum()).backward()
    true_grads = [p.grad / 2.0**10 for p in model.parameters()]
    true_norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in true_grads])).item()
    assert true_norm > 10  # far above the clip below
    before = [p.detach().clone() for p in model.parameters()]
    seen_norms = []

    def record_norm(opt, args, kwargs):
        seen_norms.append(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()])))

    optimizer.register_step_pre_hook(record_norm)
    apply_gradients(model, optimizer, scaler, clip_grad=0.5)
    assert len(seen_norms) == 1 and seen_norms[0].item() == pytest.approx(0.5, rel=1e-4)
    for p, p0, g in zip(model.parameters(), before, true_grads, strict=True):
        torch.testing.assert_close(p.detach(), p0 - 0.1 * g * (0.5 / true_norm), rtol=1e-4, atol=1e-6)
    assert scaler.get_scale() == 2.0**10

    optimizer.zero_grad()
    scaler.scale(model(torch.randn(16, 8)).sum()).backward()
    model.bias.grad[0] = float("inf")  # an fp16 overflow
    after_first = [p.detach().clone() for p in model.parameters()]
    apply_gradients(model, optimizer, scaler, clip_grad=0.5)
    assert len(seen_norms) == 1  # the optimizer did not step
    for p, p1 in zip(model.parameters(), after_first, strict=True):
        assert torch.equal(p.detach(), p1)
    assert scaler.get_scale() == 2.0**9  # backed off for the next step


def test_best_checkpoint_train_loss_and_clipping_are_what_they_say(tmp_path, monkeypatch, no_curves):
    """best.pt is the first epoch of the highest val top-1 (not a later equal, not the last); train_loss
    is the mean loss per image of the epoch; --clip-grad bounds the gradient norm every step sees."""
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    from cvt.engine import evaluate as evaluate_module

    real_evaluate = evaluate_module.evaluate
    top1_by_call = iter([80.0, 80.0, 70.0])  # epoch 1 is the best, epoch 2 only equals it

    def worse_later(*args, **kwargs):
        result = real_evaluate(*args, **kwargs)
        result.top1 = next(top1_by_call)
        return result

    norms = []

    def record_norm(optimizer, args, kwargs):
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        norms.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item())

    monkeypatch.setattr(evaluate_module, "evaluate", worse_later)
    losses = watch_training_losses(monkeypatch)
    handle = register_optimizer_step_pre_hook(record_norm)
    try:
        summary = run(micro(tmp_path, epochs=3, clip_grad=1e-3))
    finally:
        handle.remove()
    assert summary["best_epoch"] == 1 and summary["best_top1"] == 80.0
    assert torch.load(tmp_path / "run" / "best.pt", weights_only=True)["epoch"] == 1
    rows = list(csv.DictReader((tmp_path / "run" / "metrics.csv").open()))
    assert len(losses) == summary["steps"] == 12  # 4 batches of 16 per epoch (drop_last)
    per_epoch = [losses[i : i + 4] for i in range(0, 12, 4)]
    assert [float(r["train_loss"]) for r in rows] == pytest.approx([sum(e) / 4 for e in per_epoch])
    assert len(norms) == 12 and max(norms) <= 1e-3 * (1 + 1e-4)


def test_label_smoothing_reaches_the_loss(tmp_path, no_curves, monkeypatch):
    # every training loss, with the logits and labels it came from
    calls = []
    real_forward = nn.CrossEntropyLoss.forward

    def recording_forward(self, logits, targets):
        loss = real_forward(self, logits, targets)
        calls.append((logits.detach().clone(), targets.clone(), loss.item()))
        return loss

    monkeypatch.setattr(nn.CrossEntropyLoss, "forward", recording_forward)
    run(micro(tmp_path, epochs=1, label_smoothing=0.3))
    assert len(calls) == 4  # 64 images, batches of 16
    for logits, targets, loss in calls:
        assert loss == pytest.approx(F.cross_entropy(logits, targets, label_smoothing=0.3).item(), rel=1e-6)
        # near chance smoothing moves the loss little (~0.1 %), far more than float rounding
        assert abs(loss - F.cross_entropy(logits, targets).item()) > 1e-5 * loss
    row = next(csv.DictReader((tmp_path / "run" / "metrics.csv").open()))
    assert float(row["train_loss"]) == pytest.approx(sum(loss for *_, loss in calls) / len(calls), rel=1e-6)


def test_options_that_cannot_work_on_cpu(tmp_path):
    with pytest.raises(UsageError, match="fp16 needs a CUDA GPU"):
        run(micro(tmp_path, amp="fp16", device="cpu"))
    with pytest.raises(UsageError, match="SyncBatchNorm is GPU-only"):
        run(micro(tmp_path, sync_bn=True, device="cpu"))
    with pytest.raises(UsageError, match="larger than the training set"):
        run(micro(tmp_path, batch_size=128))


def test_sampler_shards_are_the_single_process_batches():
    single = ResumableSampler(50, batch_size=8, seed=1)
    ranks = [ResumableSampler(50, batch_size=4, rank=r, world_size=2, seed=1) for r in range(2)]
    order = list(single)
    assert len(order) == 48 and len(set(order)) == 48  # 6 whole batches, no repeats
    shards = [list(s) for s in ranks]
    for step in range(6):
        together = shards[0][4 * step : 4 * step + 4] + shards[1][4 * step : 4 * step + 4]
        assert sorted(together) == sorted(order[8 * step : 8 * step + 8])
    single.set_position(epoch=0, batches_done=2)
    assert list(single) == order[16:]
    single.set_position(epoch=1)
    assert list(single) != order  # a new shuffle every epoch
    assert list(ResumableSampler(50, batch_size=8, seed=2)) != order  # and another for another --seed


def test_resumed_shards_are_the_rest_of_the_single_process_order():
    """Two processes resumed after k steps: each skips its own k batches, so that together they yield
    exactly what one process with the global batch yields after k global batches."""
    single = ResumableSampler(50, batch_size=8, seed=1)
    order = list(single)
    for k in range(7):
        ranks = [ResumableSampler(50, batch_size=4, rank=r, world_size=2, seed=1) for r in range(2)]
        fresh = [list(s) for s in ranks]  # each rank's whole epoch
        for s in ranks:
            s.set_position(epoch=0, batches_done=k)
        shards = [list(s) for s in ranks]
        assert [len(s) for s in ranks] == [len(shard) for shard in shards] == [4 * (6 - k)] * 2
        assert shards == [fresh[0][4 * k :], fresh[1][4 * k :]]  # each rank's share: its own rest
        assert sorted(shards[0] + shards[1]) == sorted(order[8 * k :])
        assert not set(shards[0]) & set(shards[1])


def test_an_epoch_is_whole_accumulation_windows(tmp_path, monkeypatch, no_curves):
    """64 images in batches of 8 accumulated 3 at a time: 2 steps of 3 batches; the 2 batches left
    would add gradients to the next epoch's first step."""
    sampler = ResumableSampler(64, batch_size=8, accum_steps=3)
    assert sampler.batches_per_epoch == 6 and len(list(sampler)) == 48
    losses = watch_training_losses(monkeypatch)
    summary = run(micro(tmp_path, epochs=1, batch_size=8, accum_steps=3))
    assert summary["steps"] == 2 and len(losses) == 6


def test_no_weight_decay_on_biases_norms_and_tokens():
    model = create_model("cvt_tiny", num_classes=10, pos_embed=True)
    decay, no_decay = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    skipped = {names[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert "stage2.cls_token" in skipped and "stage0.pos_embed" in skipped and "norm.weight" in skipped
    assert "stage0.blocks.0.attn.conv_proj_k.bn.weight" in skipped and "head.bias" in skipped
    assert {names[id(p)] for p in decay["params"]} == {
        n for n, p in model.named_parameters() if p.ndim > 1 and n not in skipped
    }


def test_the_global_batch_counts_accumulation_steps(tmp_path, capsys, no_curves):
    # 8 images x 2 accumulated micro-batches: a global batch of 16, so lr 3e-3 x 16 / 32
    run(micro(tmp_path, epochs=1, batch_size=8, accum_steps=2, lr=3e-3, lr_base_batch=32))
    assert "global batch 16, lr 0.0015," in capsys.readouterr().out


def test_train_subset_is_a_seeded_random_draw(tmp_path, monkeypatch, no_curves):
    """--train-subset N draws N images at random with the run's seed (the first N images of a sorted
    data set would be a few classes only)."""
    from cvt.data import seeding

    drawn = []
    real_init = seeding.PerSampleSeeds.__init__

    def recording_init(self, dataset, seed):
        drawn.append(list(dataset.indices))
        real_init(self, dataset, seed)

    monkeypatch.setattr(seeding.PerSampleSeeds, "__init__", recording_init)
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        run(micro(tmp_path, name, epochs=1, seed=seed))
    assert len(drawn[0]) == 64 and len(set(drawn[0])) == 64 and drawn[0] != list(range(64))
    assert drawn[0] == drawn[1] and drawn[0] != drawn[2]


def test_lr_scaling_and_schedule():
    cfg = resolve_config(None, {"lr": 2.5e-4, "lr_base_batch": 256, "epochs": 10, "warmup_epochs": 1.0})
    assert effective_lr(cfg, 2048) == pytest.approx(2e-3)  # the official 8-GPU recipe
    assert effective_lr(resolve_config(None, {"lr": 0.01}), 2048) == 0.01  # no base batch: as given
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_scheduler(opt, resolve_config(None, {"lr": 1.0, "epochs": 10, "warmup_epochs": 1.0,
                                                       "warmup_lr": 0.0, "min_lr": 0.0}), 10)  # fmt: skip
    lrs = []
    for step in (0, 5, 10, 55, 100):
        sched.step_update(step)
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[:2] == pytest.approx([0.0, 0.5])  # linear warm-up over 10 steps
    assert lrs[2] == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.1)))  # cosine, counted from step 0
    assert lrs[3] == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.55)))
    assert lrs[4] == pytest.approx(0.0)
    # warm-up starts from warmup_lr and the cosine ends at min_lr: two different options
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_scheduler(opt, resolve_config(None, {"lr": 1.0, "epochs": 10, "warmup_epochs": 1.0,
                                                       "warmup_lr": 0.2, "min_lr": 0.01}), 10)  # fmt: skip
    assert opt.param_groups[0]["lr"] == pytest.approx(0.2)  # the first step's, before any step_update
    for step, expected in ((0, 0.2), (5, 0.6), (100, 0.01)):
        sched.step_update(step)
        assert opt.param_groups[0]["lr"] == pytest.approx(expected), step


def scheduled_lrs(options: dict, steps: list[int], steps_per_epoch: int = 10) -> list[float]:
    """The lr :func:`build_scheduler` sets at each of ``steps`` (unless ``options`` say otherwise: peak lr 1,
    10 epochs, 1 warm-up epoch from 0)."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    cfg = resolve_config(None, {"lr": 1.0, "epochs": 10, "warmup_epochs": 1.0, "warmup_lr": 0.0, **options})
    sched = build_scheduler(opt, cfg, steps_per_epoch)
    lrs = []
    for step in steps:
        sched.step_update(step)
        lrs.append(opt.param_groups[0]["lr"])
    return lrs


# every step after the 10 of the warm-up up to 100, the step after the last (10 epochs x 10 steps):
# the lr the last epoch's row of metrics.csv records
AFTER_WARM_UP = list(range(10, 101))


def test_step_schedule_decays_by_decay_rate_every_decay_epochs():
    lrs = scheduled_lrs({"sched": "step", "decay_epochs": 2.5, "decay_rate": 0.4}, [5, *AFTER_WARM_UP])
    assert lrs[0] == pytest.approx(0.5)  # the warm-up, as for the cosine
    # decays counted from step 0, every 25 steps
    assert lrs[1:] == pytest.approx([0.4 ** (step // 25) for step in AFTER_WARM_UP])
    assert lrs[1 + 24 - 10 : 1 + 26 - 10] == pytest.approx([1.0, 0.4])  # steps 24 and 25: the first decay


def test_multistep_schedule_decays_by_decay_rate_at_each_milestone():
    """timm's convention (it compares the step + 1 with the milestones): milestone m (epochs) applies from
    step m x steps_per_epoch - 1, the last step of epoch m, one step before the step schedule's decay."""
    lrs = scheduled_lrs({"sched": "multistep", "decay_milestones": [2, 5], "decay_rate": 0.2}, AFTER_WARM_UP)
    expected = [1.0 if step < 19 else 0.2 if step < 49 else 0.04 for step in AFTER_WARM_UP]
    assert lrs == pytest.approx(expected)


def test_constant_schedule_holds_the_lr_after_the_warm_up_to_the_end():
    """No decay ever, not even at the step after the last one; the step options are not used."""
    options = {"sched": "constant", "decay_epochs": 3.0, "decay_milestones": [2], "decay_rate": 0.5}
    lrs = scheduled_lrs(options, [0, 5, *AFTER_WARM_UP])
    assert lrs == pytest.approx([0.0, 0.5] + [1.0] * len(AFTER_WARM_UP))
    # the same for a run of 1 epoch of 4 steps, 2 of them warm-up
    lrs = scheduled_lrs({**options, "epochs": 1, "warmup_epochs": 0.5}, list(range(5)), steps_per_epoch=4)
    assert lrs == pytest.approx([0.0, 0.5, 1.0, 1.0, 1.0])


def test_sgd_follows_the_nesterov_option():
    model = torch.nn.Linear(2, 2)
    for nesterov in (True, False):
        cfg = resolve_config(None, {"optimizer": "sgd", "momentum": 0.9, "nesterov": nesterov})
        group = build_optimizer(model, cfg, 0.1).param_groups[0]
        assert (group["nesterov"], group["momentum"]) == (nesterov, 0.9)


def test_atomic_save_keeps_the_previous_file_when_the_disk_is_full(tmp_path, monkeypatch):
    target = tmp_path / "last.pt"
    atomic_torch_save({"model": {"w": torch.ones(2)}}, target)

    def full_disk(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space left"):
        atomic_torch_save({"model": {"w": torch.zeros(2)}}, target)
    assert torch.equal(torch.load(target, weights_only=True)["model"]["w"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temp file left behind


def test_resume_of_a_broken_checkpoint_is_a_clear_error(tmp_path):
    bad = tmp_path / "last.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"checkpoint .*last\.pt is not a readable PyTorch"):
        resolve_run(None, {"resume": str(bad)})
    torch.save({"model": {}}, bad)
    with pytest.raises(CheckpointError, match=r"not a cvt train checkpoint \(missing optimizer, epoch, step"):
        resolve_run(None, {"resume": str(bad)})


def test_accumulation_equals_the_large_batch(tmp_path):
    """2 accumulated micro-batches of 8 give the weights of batches of 16 (no BatchNorm: method=avg).

    SGD, not AdamW: the key bias gets a zero gradient up to rounding (softmax ignores a constant added
    to every logit of a row), and Adam would scale that rounding noise up to full-size updates.
    """
    args = {**MICRO["model_args"], "method": "avg", "drop_path_rate": 0.0}
    common = dict(epochs=1, model_args=args, optimizer="sgd", lr=0.05)
    run(micro(tmp_path, "big", **common))
    summary = run(micro(tmp_path, "accum", batch_size=8, accum_steps=2, **common))
    assert summary["steps"] == 4
    big, accum = weights(tmp_path / "big" / "last.pt"), weights(tmp_path / "accum" / "last.pt")
    for key in big:
        torch.testing.assert_close(accum[key], big[key], rtol=0, atol=1e-6, msg=key)


def test_ema_bf16_and_clipping_run_and_are_recorded(tmp_path, monkeypatch):
    # what each validation pass evaluated (weights, autocast dtype, top-1), and the autocast of training
    evaluated, training_autocast = [], set()
    real_evaluate, real_head = engine_evaluate.evaluate, CvT.forward_head

    def recording_evaluate(model, loader, device, amp_dtype=None, **kwargs):
        result = real_evaluate(model, loader, device, amp_dtype=amp_dtype, **kwargs)
        weights = {k: v.clone() for k, v in model.state_dict().items()}
        evaluated.append((weights, amp_dtype, result.top1))
        return result

    def recording_head(self, x, pre_logits=False):
        if self.training:
            training_autocast.add((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return real_head(self, x, pre_logits)

    monkeypatch.setattr(engine_evaluate, "evaluate", recording_evaluate)
    monkeypatch.setattr(CvT, "forward_head", recording_head)
    summary = run(micro(tmp_path, epochs=1, ema=True, ema_decay=0.5, amp="bf16", clip_grad=1.0))
    ckpt = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert ckpt["ema"].keys() == ckpt["model"].keys()
    assert not torch.equal(ckpt["ema"]["head.weight"], ckpt["model"]["head.weight"])  # an average, not a copy
    assert training_autocast == {(True, torch.bfloat16)}  # every training forward ran under bf16 autocast
    rows = list(csv.DictReader((tmp_path / "run" / "metrics.csv").open()))
    # one epoch: the model, then its EMA copy, each evaluated under bf16 autocast
    (model_weights, model_amp, model_top1), (ema_weights, ema_amp, ema_top1) = evaluated
    assert model_amp == ema_amp == torch.bfloat16
    assert_same_weights(model_weights, ckpt["model"])
    assert_same_weights(ema_weights, ckpt["ema"])
    assert float(rows[0]["top1"]) == pytest.approx(model_top1) and math.isfinite(summary["final_top1"])
    assert float(rows[0]["ema_top1"]) == pytest.approx(ema_top1)


def test_the_ema_copies_the_first_update_when_step_0_was_skipped(tmp_path, monkeypatch, no_curves):
    """--skip-nonfinite, a NaN loss at the first step: the first real update still copies the weights
    (its count was 2, so the EMA averaged the random initialisation in with decay 0.9998)."""
    import timm.utils
    from timm.utils import ModelEmaV3

    first: dict[str, dict[str, torch.Tensor]] = {}

    class RecordingEma(ModelEmaV3):
        def update(self, model, step=None):
            super().update(model, step=step)
            if not first:  # the EMA and the weights after the first real update
                first["ema"] = {k: v.clone() for k, v in self.module.state_dict().items()}
                first["model"] = {k: v.detach().clone() for k, v in model.state_dict().items()}

    watch_training_losses(monkeypatch, lambda n, loss: loss * float("nan") if n == 1 else loss)
    monkeypatch.setattr(timm.utils, "ModelEmaV3", RecordingEma)  # the trainer imports it when it runs
    summary = run(micro(tmp_path, epochs=1, ema=True, ema_decay=0.9998, skip_nonfinite=True))
    assert summary["skipped_steps"] == 1
    for key, value in first["model"].items():
        torch.testing.assert_close(first["ema"][key], value, msg=key)


def test_the_ema_averages_the_weights_after_each_optimizer_step(tmp_path, monkeypatch, no_curves):
    """EMA_1 = w_1, then EMA_t = d EMA_(t-1) + (1 - d) w_t, w_t the weights the t-th optimizer step
    left (timm's schedule: the first update copies). An update before the step would average weights one
    step stale; the 0-based step given before (ModelEmaV3's decay is 0 up to step 1) copied twice."""
    import timm.utils
    from timm.utils import ModelEmaV3
    from torch.optim.optimizer import register_optimizer_step_post_hook

    seen: dict = {"steps": []}

    class RecordingEma(ModelEmaV3):
        def __init__(self, model, **kwargs):
            super().__init__(model, **kwargs)
            seen["model"] = model

    def after_step(optimizer, args, kwargs):
        seen["steps"].append({k: v.detach().clone() for k, v in seen["model"].named_parameters()})

    monkeypatch.setattr(timm.utils, "ModelEmaV3", RecordingEma)  # the trainer imports it when it runs
    handle = register_optimizer_step_post_hook(after_step)
    try:
        run(micro(tmp_path, epochs=1, ema=True, ema_decay=0.5))
    finally:
        handle.remove()
    assert len(seen["steps"]) == 4
    expected = seen["steps"][0]
    for weights_after_step in seen["steps"][1:]:
        expected = {k: 0.5 * expected[k] + 0.5 * weights_after_step[k] for k in expected}
    ema = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["ema"]
    for key, value in expected.items():
        torch.testing.assert_close(ema[key], value, rtol=1e-5, atol=1e-6, msg=key)
    assert not torch.equal(ema["head.weight"], seen["steps"][-1]["head.weight"])  # an average, not a copy


def test_finetune_keeps_the_body_resets_the_head_and_resizes_position_embeddings(tmp_path):
    from cvt.engine.trainer import _load_finetune

    torch.manual_seed(0)
    source = create_model("cvt_tiny", num_classes=10, img_size=16, pos_embed=True, **MICRO["model_args"])
    torch.save({"model": source.state_dict(), "epoch": 3}, tmp_path / "best.pt")
    target = create_model("cvt_tiny", num_classes=12, img_size=32, pos_embed=True, **MICRO["model_args"])
    fresh_head = target.head.weight.clone()
    _load_finetune(target, str(tmp_path / "best.pt"))
    got, want = target.state_dict(), source.state_dict()
    assert torch.equal(got["stage1.blocks.0.attn.proj_q.weight"], want["stage1.blocks.0.attn.proj_q.weight"])
    assert torch.equal(got["stage2.cls_token"], want["stage2.cls_token"])
    assert torch.equal(target.head.weight, fresh_head)  # 12 classes: the new head is kept
    assert want["stage0.pos_embed"].shape == (1, 8 * 8, 8)
    assert got["stage0.pos_embed"].shape == (1, 16 * 16, 8)
    # bicubic resizing keeps each channel's mean: the values are interpolated, not re-initialised
    assert torch.allclose(got["stage0.pos_embed"].mean(1), want["stage0.pos_embed"].mean(1), atol=0.02)
    # a file of another architecture: the error names that file (it was "checkpoint state dict")
    other = create_model("cvt_tiny", num_classes=10, img_size=16)
    torch.save({"model": other.state_dict(), "epoch": 1}, tmp_path / "other.pt")
    with pytest.raises(
        CheckpointError, match=f"checkpoint {re.escape(str(tmp_path / 'other.pt'))} does not fit"
    ):
        _load_finetune(target, str(tmp_path / "other.pt"))


def test_finetune_with_the_same_class_count_keeps_the_trained_head(tmp_path):
    from cvt.engine.trainer import _load_finetune

    torch.manual_seed(0)
    source = create_model("cvt_tiny", num_classes=10, img_size=16, **MICRO["model_args"])
    torch.save({"model": source.state_dict(), "epoch": 3}, tmp_path / "best.pt")
    torch.manual_seed(1)
    target = create_model("cvt_tiny", num_classes=10, img_size=16, **MICRO["model_args"])
    _load_finetune(target, str(tmp_path / "best.pt"))
    assert torch.equal(target.head.weight, source.head.weight)
    assert torch.equal(target.head.bias, source.head.bias)


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_finetune_from_a_headless_backbone_keeps_the_body_and_a_fresh_head(tmp_path, fmt):
    """A backbone saved with ``num_classes=0`` (no head at all) starts a run as one with another head."""
    from cvt.checkpoint.native import save_checkpoint
    from cvt.engine.trainer import _load_finetune

    torch.manual_seed(0)
    backbone = create_model("cvt_tiny", num_classes=0, img_size=16, **MICRO["model_args"])
    path = tmp_path / f"backbone.{fmt}"
    if fmt == "pt":
        torch.save({"model": backbone.state_dict()}, path)
    else:
        save_checkpoint(backbone, path)
    torch.manual_seed(1)
    target = create_model("cvt_tiny", num_classes=10, img_size=16, **MICRO["model_args"])
    fresh_head = target.head.weight.clone()
    _load_finetune(target, str(path))
    got = target.state_dict()
    for key, value in backbone.state_dict().items():
        assert torch.equal(got[key], value), key
    assert torch.equal(target.head.weight, fresh_head)


def test_finetune_adapts_an_rgb_stem_to_a_grayscale_model_and_names_the_channels_otherwise(tmp_path):
    """An RGB checkpoint fine-tuned into ``in_chans=1``: its stem summed over R, G and B (a gray image
    (g, g, g) gives the same stem output), every other weight as saved; a grayscale checkpoint into an
    RGB model is refused with the channel count to build it with."""
    from cvt.engine.trainer import _load_finetune

    torch.manual_seed(0)
    rgb = create_model("cvt_tiny", num_classes=10, img_size=16, **MICRO_MODEL_ARGS).eval()
    torch.save({"model": rgb.state_dict()}, tmp_path / "rgb.pt")
    gray = create_model("cvt_tiny", num_classes=10, img_size=16, in_chans=1, **MICRO_MODEL_ARGS).eval()
    _load_finetune(gray, str(tmp_path / "rgb.pt"))
    stem = "stage0.patch_embed.proj.weight"
    loaded, saved = gray.state_dict(), rgb.state_dict()
    torch.testing.assert_close(loaded[stem], saved[stem].sum(dim=1, keepdim=True))
    assert all(torch.equal(loaded[k], saved[k]) for k in saved if k != stem)
    image = torch.rand(2, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(gray(image), rgb(image.expand(-1, 3, -1, -1)), atol=1e-5, rtol=1e-4)

    torch.save({"model": gray.state_dict()}, tmp_path / "gray.pt")
    target = create_model("cvt_tiny", num_classes=10, img_size=16, **MICRO_MODEL_ARGS)
    with pytest.raises(
        CheckpointError, match=r"Its stem takes 1 input channel\(s\): build the model with in_chans=1$"
    ):
        _load_finetune(target, str(tmp_path / "gray.pt"))


def test_finetune_resizes_position_embeddings_from_the_grid_they_were_learned_at(tmp_path):
    """A file that records its input size (here 16x24 tokens at 32x48) is resized from that grid, even
    to a grid with the same token count (24x16); an unrecorded, non-square count is refused."""
    from timm.layers import resample_abs_pos_embed

    from cvt.checkpoint import save_checkpoint
    from cvt.engine.trainer import _load_finetune

    torch.manual_seed(0)
    source = create_model("cvt_tiny", img_size=(32, 48), pos_embed=True)
    learned = source.state_dict()["stage0.pos_embed"]  # (1, 16 * 24, 32)
    save_checkpoint(source, tmp_path / "wide.safetensors")
    same = create_model("cvt_tiny", img_size=(32, 48), pos_embed=True)
    _load_finetune(same, str(tmp_path / "wide.safetensors"))
    assert torch.equal(same.state_dict()["stage0.pos_embed"], learned)
    tall = create_model("cvt_tiny", img_size=(48, 32), pos_embed=True)
    _load_finetune(tall, str(tmp_path / "wide.safetensors"))
    expected = resample_abs_pos_embed(learned, [24, 16], [16, 24], num_prefix_tokens=0)
    assert torch.equal(tall.state_dict()["stage0.pos_embed"], expected)

    torch.save(source.state_dict(), tmp_path / "official.pth")  # records no input size
    same = create_model("cvt_tiny", img_size=(32, 48), pos_embed=True)
    _load_finetune(same, str(tmp_path / "official.pth"))  # they fit as they are: taken as learned there
    assert torch.equal(same.state_dict()["stage0.pos_embed"], learned)
    with pytest.raises(CheckpointError, match=r"stage0.pos_embed of .* holds 384 position embeddings"):
        _load_finetune(create_model("cvt_tiny", pos_embed=True), str(tmp_path / "official.pth"))


def record_model_inputs(monkeypatch) -> dict[str, list[torch.Tensor]]:
    """Patch the trainer's model builder so that every batch the model sees is recorded, under
    ``train`` or ``eval`` by the mode the model was in."""
    from cvt.engine import trainer

    seen: dict[str, list[torch.Tensor]] = {"train": [], "eval": []}
    real_build = trainer._build_model

    def build_and_watch(*args, **kwargs):
        model = real_build(*args, **kwargs)
        model.register_forward_pre_hook(
            lambda module, inputs: seen["train" if module.training else "eval"].append(inputs[0].clone())
        )
        return model

    monkeypatch.setattr(trainer, "_build_model", build_and_watch)
    return seen


def test_validation_sees_the_eval_preprocessing_of_a_small_image_data_set(tmp_path, monkeypatch, no_curves):
    """Validation batches are the deterministic eval pipeline, the same every epoch, never the training
    augmentations; an ImageNet-configured variant (cvt_13's 0.875 center crop) on digits is evaluated on
    the whole image, as the small-image data sets are."""
    from cvt.data import build_dataset, build_transform, resolve_data_config

    seen = record_model_inputs(monkeypatch)
    run(micro(tmp_path, model="cvt_13", epochs=2, random_crop=True))
    val_set = build_dataset("digits", None, "val")
    model = create_model("cvt_13", num_classes=10, img_size=16, **MICRO["model_args"])
    data_cfg = resolve_data_config(model, "digits")
    assert data_cfg["crop_pct"] == 1.0 and model.pretrained_cfg["crop_pct"] == 0.875
    transform = build_transform(data_cfg, train=False)
    expected = torch.stack([transform(image) for image, _ in val_set])
    per_epoch = len(seen["eval"]) // 2
    first, second = (torch.cat(seen["eval"][i * per_epoch : (i + 1) * per_epoch]) for i in range(2))
    assert torch.equal(first, expected) and torch.equal(second, expected)


def image_keys(batches: list[torch.Tensor]) -> set[bytes]:
    return {image.numpy().tobytes() for batch in batches for image in batch}


@pytest.mark.parametrize("random_crop", [True, False])
def test_each_epoch_draws_new_augmentations(tmp_path, monkeypatch, no_curves, random_crop):
    """With random crops, an image is cropped anew every epoch (its per-sample seed moves with the
    epoch); without augmentation the epochs see the same images (the control)."""
    seen = record_model_inputs(monkeypatch)
    run(micro(tmp_path, epochs=2, random_crop=random_crop))
    first, second = image_keys(seen["train"][:4]), image_keys(seen["train"][4:8])
    assert len(first) == len(second) == 64
    if random_crop:
        assert len(first & second) < 16  # 25 offsets of a 2-pixel pad: a few repeat by chance
    else:
        assert first == second


@pytest.mark.parametrize("enabled", [True, False])
def test_grad_checkpointing_option_recomputes_the_blocks(tmp_path, monkeypatch, no_curves, enabled):
    from cvt.models import cvt as cvt_model

    calls = []
    real = cvt_model._checkpointed
    monkeypatch.setattr(cvt_model, "_checkpointed", lambda *args: calls.append(1) or real(*args))
    run(micro(tmp_path, epochs=1, grad_checkpointing=enabled))
    assert len(calls) == (4 * 3 if enabled else 0)  # 4 training steps x 3 blocks; validation: no grad


def test_a_grayscale_model_trains_and_evaluates_on_the_luma_of_the_images(
    tmp_path, monkeypatch, no_curves, capsys
):
    """``in_chans=1`` through model_args: training and validation batches are the one-channel luma of
    what a 3-channel model reads (the digits' mean and std are the same in R, G and B), and ``cvt eval``
    of the checkpoint reproduces the run's last validation accuracy."""
    from cvt.cli.main import main
    from cvt.data import build_dataset, build_transform, resolve_data_config

    seen = record_model_inputs(monkeypatch)
    summary = run(micro(tmp_path, epochs=1, model_args={**MICRO_MODEL_ARGS, "in_chans": 1}))
    assert all(batch.shape[1] == 1 for batch in seen["train"] + seen["eval"])
    rgb_model = create_model("cvt_tiny", num_classes=10, img_size=16, **MICRO_MODEL_ARGS)
    rgb_transform = build_transform(resolve_data_config(rgb_model, "digits"), train=False)
    luma = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    rgb = torch.stack([rgb_transform(image) for image, _ in build_dataset("digits", None, "val")])
    expected = (rgb * luma).sum(1, keepdim=True)  # (N, 1, 16, 16)
    torch.testing.assert_close(torch.cat(seen["eval"]), expected, atol=1e-6, rtol=0)

    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(tmp_path / "run" / "last.pt"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["input_size"] == [1, 16, 16] and report["num_samples"] == len(expected)
    assert report["top1"] == pytest.approx(summary["final_top1"])


def test_a_run_at_zero_top1_still_keeps_best_pt_of_its_first_epoch(tmp_path, monkeypatch, no_curves):
    """A top-1 of 0 (a hard data set, the first epochs) is a best so far: best.pt is written at epoch 1
    and the summary names it, as for any other accuracy (the best starts below every possible top-1)."""
    real_evaluate = engine_evaluate.evaluate

    def at_zero(*args, **kwargs):
        result = real_evaluate(*args, **kwargs)
        result.top1 = 0.0
        return result

    monkeypatch.setattr(engine_evaluate, "evaluate", at_zero)
    summary = run(micro(tmp_path, epochs=2, train_subset=32))
    assert (summary["best_epoch"], summary["best_top1"]) == (1, 0.0)
    best = torch.load(tmp_path / "run" / "best.pt", weights_only=True)
    assert (best["epoch"], best["step"]) == (1, 2)


def test_tensorboard_logs_the_lr_and_train_loss_under_train_and_validation_under_val(tmp_path, no_curves):
    """Each metrics.csv column but epoch and time is a TensorBoard scalar at the epoch's last step,
    with the csv's values: train/train_loss and train/lr, val/val_loss, val/top1, val/top5, val/ema_top1."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    run(micro(tmp_path, epochs=2, train_subset=32, ema=True))
    events = EventAccumulator(str(out / "tb"))
    events.Reload()
    columns = {"train/train_loss": "train_loss", "train/lr": "lr", "val/val_loss": "val_loss",
               "val/top1": "top1", "val/top5": "top5", "val/ema_top1": "ema_top1"}  # fmt: skip
    assert set(events.Tags()["scalars"]) == set(columns)
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    for tag, column in columns.items():
        assert [e.step for e in events.Scalars(tag)] == [2, 4], tag
        assert [e.value for e in events.Scalars(tag)] == pytest.approx([float(r[column]) for r in rows]), tag


def test_a_ctrl_c_in_a_later_epoch_stops_after_its_step_with_the_time_trained_so_far(
    tmp_path, monkeypatch, capfd, no_curves
):
    """A Ctrl-C during a step of epoch 2 is announced as stopping after this step (not after a
    validation, as in epoch 1's); last.pt holds the time trained up to that step, beyond epoch 1's, and
    the resumed run adds its own time to the checkpoint's (set here to 1000 s, far above a micro run)."""
    import signal

    from cvt.engine.trainer import TrainingInterrupted

    def ctrl_c_during_the_sixth_batch(n, loss):
        if n == 6:
            os.kill(os.getpid(), signal.SIGINT)
        return loss

    watch_training_losses(monkeypatch, ctrl_c_during_the_sixth_batch)
    with pytest.raises(TrainingInterrupted, match="at step 6 "):
        run(micro(tmp_path, epochs=2))
    assert "SIGINT: stopping after this step" in capfd.readouterr().err
    last = tmp_path / "run" / "last.pt"
    state = torch.load(last, weights_only=True)
    epoch_one = torch.load(tmp_path / "run" / "best.pt", weights_only=True)
    assert (state["step"], epoch_one["step"]) == (6, 4)
    assert state["train_seconds"] > epoch_one["train_seconds"] > 0  # counted up to the interruption
    atomic_torch_save({**state, "train_seconds": 1000.0}, last)
    watch_training_losses(monkeypatch)  # no more signals
    summary = run({"output": str(tmp_path / "run"), "resume": "auto"})
    assert summary["steps"] == 8
    assert 1000.0 < summary["train_seconds"] < 1000.0 + 600
    assert (
        json.loads((tmp_path / "run" / "summary.json").read_text())["train_seconds"]
        == summary["train_seconds"]
    )


def test_a_resumed_run_keeps_counting_the_skipped_steps_of_the_checkpoint(tmp_path, monkeypatch, no_curves):
    """A step skipped for a NaN loss before the checkpoint stays in summary.json's skipped_steps after a
    resume (the count is of the whole run, as steps is)."""

    def nan_at_third_batch(n, loss):
        return loss * float("nan") if n == 3 else loss

    watch_training_losses(monkeypatch, nan_at_third_batch)
    assert run(micro(tmp_path, epochs=1, skip_nonfinite=True))["skipped_steps"] == 1
    watch_training_losses(monkeypatch)  # the resumed epoch's losses are all finite
    summary = run({"epochs": 2, "output": str(tmp_path / "run"), "resume": "auto"})
    assert (summary["steps"], summary["skipped_steps"]) == (8, 1)


def test_a_checkpoint_without_best_epoch_resumes_with_the_first_epoch_of_its_best_top1(
    tmp_path, monkeypatch, no_curves
):
    """Checkpoints of earlier versions record best_top1 but no best_epoch: the resumed run finds it in
    the history (the first epoch at that top-1), so summary.json names epoch 2, not 0."""
    real_evaluate = engine_evaluate.evaluate
    top1_by_epoch = iter([60.0, 80.0, 80.0, 70.0])

    def scripted(*args, **kwargs):
        result = real_evaluate(*args, **kwargs)
        result.top1 = next(top1_by_epoch)
        return result

    monkeypatch.setattr(engine_evaluate, "evaluate", scripted)
    run(micro(tmp_path, epochs=3, train_subset=32))
    last = tmp_path / "run" / "last.pt"
    state = torch.load(last, weights_only=True)
    assert (state["best_top1"], state["best_epoch"]) == (80.0, 2)
    del state["best_epoch"]
    atomic_torch_save(state, last)
    summary = run({"epochs": 4, "output": str(tmp_path / "run"), "resume": "auto"})
    assert (summary["best_top1"], summary["best_epoch"]) == (80.0, 2)


def test_a_dead_data_loader_worker_is_a_clear_error_and_other_errors_pass_through():
    """A worker killed by the OS (for memory, usually) surfaces as a DataLoaderWorkerError that says
    what to do; any other RuntimeError of the batches is raised as it is."""
    from cvt.engine.trainer import DataLoaderWorkerError, _epoch_batches

    class Failing:
        def __init__(self, error):
            self.error = error

        def __iter__(self):
            yield "first batch"
            raise self.error

    died = RuntimeError("DataLoader worker (pid(s) 4242) exited unexpectedly")
    batches = _epoch_batches(Failing(died), None)
    assert next(batches) == "first batch"
    with pytest.raises(
        DataLoaderWorkerError, match=r"died \(DataLoader worker \(pid\(s\) 4242\) exited .*--workers 0"
    ):
        next(batches)
    other = RuntimeError("mat1 and mat2 shapes cannot be multiplied")
    with pytest.raises(RuntimeError) as caught:
        list(_epoch_batches(Failing(other), None))
    assert caught.value is other


def test_an_epoch_whose_every_step_was_skipped_has_no_train_loss(tmp_path, monkeypatch, no_curves):
    """No finite loss in the epoch (every step skipped with --skip-nonfinite): its train_loss is NaN,
    not a 0.0 that reads as a perfect fit."""
    watch_training_losses(monkeypatch, lambda n, loss: loss * float("nan"))
    summary = run(micro(tmp_path, epochs=1, train_subset=32, skip_nonfinite=True))
    assert (summary["steps"], summary["skipped_steps"]) == (2, 2)
    (row,) = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["history"]
    assert math.isnan(row["train_loss"])
