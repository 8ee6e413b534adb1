"""Resuming a run: which checkpoint ``--resume`` names, the config it continues under, where in its
epoch it continues, what a checkpoint holds, and which ``best.pt`` stays the best so far.

:func:`resolve_run` turns a YAML file and flags into a :class:`~cvt.engine.config.TrainConfig`, based
on the checkpoint's own config when resuming; :func:`checkpoint_state` is what every ``last.pt`` and
``best.pt`` holds; the training loop (:mod:`cvt.engine.trainer`) calls the rest.
"""

from __future__ import annotations

import pickle
import struct
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cvt.engine.config import RUN_CONTROL, TrainConfig, resolve_config, validate
from cvt.engine.rundir import is_own_checkpoint, lies_in
from cvt.engine.state import capture_rng, load_train_checkpoint
from cvt.errors import CheckpointError, UsageError, is_out_of_memory
from cvt.fileio import atomic_write_bytes, check_folder_path


def resolve_run(yaml_source: str | None, flags: dict[str, Any]) -> tuple[TrainConfig, dict[str, Any] | None]:
    """The run's config and, when resuming, its checkpoint.

    Without ``resume``: defaults ← YAML ← flags. With ``resume PATH`` (or ``auto`` and an existing
    ``<run>/last.pt``): the checkpoint's config ← YAML ← flags, so ``--epochs`` can extend a run.
    """
    # where the run is: checked against the checkpoint's config once read (against the defaults, a
    # resume with --lr below the default min_lr was refused whatever the run's schedule)
    cfg = resolve_config(yaml_source, flags, check=False)
    if cfg.output:  # an output that cannot be a folder is refused before a checkpoint is read
        check_folder_path(Path(cfg.output))
    ckpt = resume_checkpoint(cfg)
    if ckpt is None:
        return validate(cfg), None
    path = resume_path(cfg)
    # how the interrupted run was started (--overwrite, its own --resume) does not carry over; older
    # checkpoints still record it
    saved = {
        k: v
        for k, v in ckpt["config"].items()
        if k in TrainConfig.__dataclass_fields__ and k not in RUN_CONTROL
    }
    base = resolve_config(None, saved)
    # the run continues in the checkpoint's folder unless --output says otherwise
    run_flags = {"output": flags.get("output") or str(path.parent), **flags, "resume": cfg.resume}
    return resolve_config(yaml_source, run_flags, base=base), ckpt


def resume_checkpoint(cfg: TrainConfig) -> dict[str, Any] | None:
    """The checkpoint ``cfg.resume`` names, loaded; None without ``resume``, or for ``auto`` when the
    run folder holds no checkpoint yet (a fresh run in that folder)."""
    if not cfg.resume:
        return None
    path = resume_path(cfg)
    if cfg.resume == "auto" and not path.is_file():
        return None
    return load_train_checkpoint(path)


def resume_path(cfg: TrainConfig) -> Path:
    """The checkpoint ``cfg.resume`` names: a path, or for ``auto`` ``<run>/last.pt`` — or ``best.pt``
    of a run killed between the two saves that end its first epoch (``best.pt`` is written first;
    no ``last.pt`` and no ``metrics.csv`` yet), whose state it holds."""
    if cfg.resume != "auto":
        return Path(cfg.resume)
    last, best = cfg.run_dir / "last.pt", cfg.run_dir / "best.pt"
    first_epoch_cut = best.is_file() and not last.exists() and not (cfg.run_dir / "metrics.csv").exists()
    return best if first_epoch_cut else last


def checkpoint_state(
    model: nn.Module, optimizer: Any, scaler: Any, ema: Any, cfg: TrainConfig, progress: dict[str, Any],
    classes: list[str], world_size: int, train_images: int,
) -> dict[str, Any]:  # fmt: skip
    """Everything a resumed run needs, as tensors and plain containers (``weights_only``-loadable).

    No scheduler state: the lr is a function of the step, and a resumed run follows its own options.
    ``train_images``: the training set's size, whose epoch the schedule and the data position count.
    """
    geometry = dict(batch_size=cfg.batch_size, world_size=world_size, accum_steps=cfg.accum_steps)
    return {
        "batch_geometry": {**geometry, "train_images": train_images},
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else {},
        "ema": ema.module.state_dict() if ema is not None else {},
        "rng": capture_rng(),
        "config": config_to_record(cfg, model),
        "classes": list(classes),
        **progress,  # epoch, batches_done, step, history, best_top1, epoch sums, train_seconds
    }


def check_same_data(resume: dict[str, Any], cfg: TrainConfig, train_images: int, mid_epoch: bool) -> None:
    """Refuse to continue the checkpoint ``resume`` on other training data: another number of images
    (``--train-subset``, images added or removed: the schedule's steps per epoch and the position in
    the epoch count the old set), or another ``--seed`` where it chose the data (the subset of
    ``--train-subset``, or the order of the epoch stopped ``mid_epoch``)."""
    saved = (resume.get("batch_geometry") or {}).get("train_images")  # None: checkpoints of earlier versions
    if saved is not None and saved != train_images:
        raise CheckpointError(
            f"the checkpoint to resume was trained on {saved} images an epoch, this run has {train_images} "
            f"(another --train-subset, or images added to or removed from the training set): its lr "
            f"schedule and data position count epochs of {saved}; resume with the same training set, or "
            f"start a new run from it with --finetune"
        )
    saved_seed = (resume.get("config") or {}).get("seed", cfg.seed)
    if saved_seed != cfg.seed and (mid_epoch or cfg.train_subset is not None):
        subset = cfg.train_subset is not None
        chose = "the --train-subset images" if subset else "the order of the epoch it stopped in"
        raise CheckpointError(
            f"the checkpoint to resume was trained with --seed {saved_seed}, this run has {cfg.seed}, which "
            f"chooses {chose}: resume with --seed {saved_seed}, or start a new run from it with --finetune"
        )


def resumed_position(resume: dict[str, Any], batches_done: int, cfg: TrainConfig, world_size: int) -> int:
    """The resumed position in the epoch, in this run's batches per process.

    The schedule counts optimizer steps and the data order is cut into global batches, so a run may
    only continue with the global batch (batch size x processes x accumulation steps) it was saved
    with; split otherwise (fewer processes, more accumulation), the samples already used are the same.
    """
    saved = resume.get("batch_geometry")
    if saved is None:  # checkpoints of earlier versions: the geometry of the options they record
        return batches_done
    saved_global = saved["batch_size"] * saved["world_size"] * saved["accum_steps"]
    global_batch = cfg.batch_size * world_size * cfg.accum_steps
    if saved_global != global_batch:
        raise CheckpointError(
            f"the checkpoint to resume was trained with a global batch of {saved_global} (batch size "
            f"{saved['batch_size']} x {saved['world_size']} process(es) x {saved['accum_steps']} "
            f"accumulation step(s)), this run has {global_batch} ({cfg.batch_size} x {world_size} x "
            f"{cfg.accum_steps}): its lr schedule and data position count steps of {saved_global} images; "
            f"resume with the same global batch, or start a new run from it with --finetune"
        )
    # saves happen at step boundaries, so the samples used fill whole batches of the new split
    return batches_done * saved["batch_size"] * saved["world_size"] // (cfg.batch_size * world_size)


def first_epoch_with(history: list[dict[str, float]], top1: float) -> int:
    """The first epoch of ``history`` that reached ``top1`` (0 when none did)."""
    return next((row["epoch"] for row in history if row["top1"] == top1), 0)


# what torch.load raises for a file that is not a whole checkpoint: the disk (OSError), torch's zip
# reader (RuntimeError: not a zip, truncated), its weights-only unpickler on damaged bytes (UnpicklingError,
# EOFError, struct.error, ValueError such as UnicodeDecodeError)
_DAMAGED_FILE_ERRORS = (OSError, RuntimeError, pickle.UnpicklingError, EOFError, struct.error, ValueError)


def _read_checkpoint(path: Path) -> dict[str, Any]:
    """The checkpoint ``path`` (its weights memory-mapped, not read), or ``{}`` when there is none or
    it cannot be read."""
    if not path.is_file():
        return {}
    try:  # mmap: only the scalars and the history are read, not the weights
        best = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except _DAMAGED_FILE_ERRORS as err:  # as good as no file; out of memory is not
        if is_out_of_memory(err):
            raise
        return {}
    return best if isinstance(best, dict) else {}


def _ahead_of(best: dict[str, Any], progress: dict[str, Any]) -> bool:
    """Whether ``best`` (a ``best.pt``) was saved later in the run that ``progress`` was resumed from,
    with a higher top-1: its history continues the checkpoint's (a run killed after writing an epoch's
    ``best.pt`` and before its ``last.pt``)."""
    history, own = best.get("history"), progress.get("history", [])
    if not isinstance(history, list) or len(history) <= len(own):
        return False
    if not isinstance(best.get("best_top1"), (int, float)) or best["best_top1"] <= progress["best_top1"]:
        return False
    return all(
        isinstance(row, dict) and (row.get("epoch"), row.get("top1")) == (mine["epoch"], mine["top1"])
        for row, mine in zip(history, own, strict=False)  # the checkpoint's rows: the first of best's
    )


def carry_best(resume_from: Path, run_dir: Path, progress: dict[str, Any]) -> None:
    """Make the best so far of a resumed run what the ``best.pt`` beside its checkpoint holds.

    That ``best.pt`` may be ahead of the checkpoint: written for an epoch whose ``last.pt`` a kill
    prevented. Its best (top-1 and epoch) is then taken over, so the retrained epochs replace it only
    when they do better and the summary names the epoch it holds. A run resumed into another folder
    takes the source run's ``best.pt`` along, so that the new folder's ``best.pt`` and summary keep
    meaning the best epoch so far. Without a ``best.pt`` of that best beside the checkpoint, the best
    is counted anew from the epochs trained there (warned), in the run's own folder too (a ``best.pt``
    deleted or damaged there), so that the summary never names a best epoch that no ``best.pt`` holds.
    """
    same_folder = lies_in(resume_from, run_dir)
    if progress["best_top1"] < 0 and same_folder:
        return  # no epoch ended yet: a best.pt beside it (a kill mid-epoch 1) is retrained over anyway
    source = resume_from.parent / "best.pt"
    best = _read_checkpoint(source)
    if _ahead_of(best, progress):
        best_epoch = int(best.get("best_epoch") or best["epoch"])  # files of earlier versions: its epoch
        progress.update(best_top1=float(best["best_top1"]), best_epoch=best_epoch)
    if progress["best_top1"] < 0:
        return
    if best.get("best_top1") == progress["best_top1"]:
        if not same_folder:
            atomic_write_bytes(run_dir / "best.pt", source.read_bytes())
        return
    warnings.warn(
        f"no best.pt of the best epoch so far (top-1 {progress['best_top1']:.2f}) beside {resume_from}: "
        f"best.pt in {run_dir} will be the best of the epochs trained from here on",
        stacklevel=2,
    )
    progress.update(best_top1=-1.0, best_epoch=0)


def check_not_rewinding(resume_from: Path, run_dir: Path, resume: dict[str, Any]) -> None:
    """Refuse (:class:`~cvt.errors.UsageError`) to continue a run in its own folder from its
    ``best.pt`` while its ``last.pt`` is further on: the run would overwrite ``last.pt`` and
    ``metrics.csv`` from the earlier step, discarding the later ones."""
    last = run_dir / "last.pt"
    if not is_own_checkpoint(resume_from, run_dir) or resume_from.resolve() == last.resolve():
        return
    later = _read_checkpoint(last)
    later_step, step = later.get("step"), resume.get("step", 0)
    if isinstance(later_step, int) and later_step > step:
        raise UsageError(
            f"{last} is further on than {resume_from} (step {later_step} against {step}): continuing "
            f"from {resume_from.name} here would discard the later steps; pass --resume auto to continue "
            f"{last.name}, or --output to continue {resume_from.name} in a new folder"
        )


# the options whose change makes a checkpoint's weights or optimizer state not fit the model built
_FIT_OPTIONS = ("model", "num_classes", "img_size", "model_args", "optimizer")


def misfit_message(
    resume: dict[str, Any], cfg: TrainConfig, model: nn.Module, err: Exception | None = None
) -> str:
    """One line for a checkpoint to resume that does not load into this run's model or optimizer:
    the recorded options that differ from this command's, or else the first line of torch's ``err``."""
    recorded = resume.get("config") or {}
    now = config_to_record(cfg, model)
    differ = [
        f"{key} {recorded[key]!r} (this command: {now[key]!r})"
        for key in _FIT_OPTIONS
        if key in recorded and key in now and recorded[key] != now[key]
    ]
    if differ:
        what = "; ".join(differ)
    else:  # torch's message: a header line, then one indented line per kind of mismatch
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        detail = lines[1] if len(lines) > 1 else (lines[0] if lines else type(err).__name__)
        what = f"other weights ({detail[:300]})"
    return (
        f"the checkpoint to resume does not fit {cfg.model} with {model.num_classes} classes and optimizer "
        f"{cfg.optimizer} (this command's): it was trained with {what}; resume with the options it was "
        f"trained with, or start a new run from it with --finetune"
    )


def config_to_record(cfg: TrainConfig, model: nn.Module) -> dict[str, Any]:
    """The run's options as ``config.yaml`` and checkpoints record them, with the resolved class
    count and resolution."""
    return {**cfg.recorded(), "num_classes": model.num_classes, "img_size": model.img_size[0]}
