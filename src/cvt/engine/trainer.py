"""The training loop of ``cvt train``, readable top to bottom.

:func:`~cvt.engine.resume.resolve_run` turns a YAML file and flags into a :class:`TrainConfig` (based
on the checkpoint's config when resuming); :func:`train` then builds data, model, optimizer and
schedule, and runs one explicit loop: autocast → loss → finite check → backward (accumulated) →
unscale → clip → step → lr per step → EMA, with validation, checkpoints and logs at the end of every
epoch.

Exact resume: a checkpoint stores the model, optimizer, grad scaler, EMA, the position in the epoch
and every RNG state; the lr is a function of the step, set from the resumed run's options (so
``--epochs``, ``--lr``, ``--sched`` … given on resume take effect). The data order of an epoch
depends only on ``(seed, epoch)`` (:class:`~cvt.engine.sampler.ResumableSampler`), so a run
restarted from ``last.pt`` — even one written mid-epoch by ``--save-every-steps`` — continues with
the very batches, augmentations and dropout masks of the uninterrupted run (bit-exact on CPU with
``--deterministic``, with any number of workers: augmentations are seeded per sample,
:mod:`cvt.data.seeding`). The global batch must stay the saved one (its steps are what the schedule
and the position count); its split into processes and accumulation steps may change.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from cvt.engine.config import TrainConfig, augment_config, run_model_kwargs
from cvt.engine.distributed import DistEnv, any_rank, init_distributed, mean_over_ranks, shutdown_distributed
from cvt.engine.optim import build_optimizer, build_scheduler, effective_lr
from cvt.engine.resume import (
    carry_best,
    check_not_rewinding,
    checkpoint_state,
    config_to_record,
    first_epoch_with,
    misfit_message,
    resume_path,
    resumed_position,
)
from cvt.engine.rundir import (
    ReplacedRun,
    TensorBoardLog,
    check_run_dir,
    lock_run_dir,
    never_saved,
    plot_curves,
    prepare_run_dir,
    write_config,
    write_metrics,
    write_summary,
)
from cvt.engine.sampler import ResumableSampler
from cvt.engine.state import atomic_torch_save, restore_rng
from cvt.errors import CheckpointError, CvtError, UsageError, first_line
from cvt.precision import autocast, autocast_dtype


class NonFiniteLossError(CvtError):
    """The loss became NaN or infinite (the run stops unless ``--skip-nonfinite``) at optimizer ``step``."""

    def __init__(self, message: str, step: int) -> None:
        super().__init__(message)
        self.step = step


class DataLoaderWorkerError(CvtError):
    """A data-loader worker process died (killed by the OS, usually for memory)."""


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped by Ctrl-C (SIGINT), SIGTERM or SIGHUP (``signum``); the message says what was
    saved. A ``KeyboardInterrupt``, so code that stops on Ctrl-C stops on it too; the CLI exits with
    128 + ``signum`` (130 for Ctrl-C, 143 for SIGTERM)."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum


def _set_deterministic(enabled: bool) -> None:
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it to be deterministic
        torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(enabled)


def _build_model(cfg: TrainConfig, num_classes: int, resuming: bool) -> nn.Module:
    """The variant with the data set's class count, started from the published weights or ``finetune``
    weights when asked, unless ``resuming``: the checkpoint holds every weight, and the file or hub
    weights the run started from may be gone (moved, offline)."""
    from cvt.models import create_model

    overrides = run_model_kwargs(cfg.model_args, cfg.img_size)
    pretrained = cfg.pretrained and not resuming
    model = create_model(cfg.model, pretrained=pretrained, num_classes=num_classes, **overrides)
    if cfg.finetune and not resuming:
        _load_finetune(model, cfg.finetune)
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model


def _load_finetune(model: nn.Module, path: str) -> None:
    """Load every weight of ``path`` into ``model``; a head of another class count stays fresh,
    position embeddings learned at another resolution are resized (bicubic) to the model's grids, and
    an RGB stem is adapted to the model's ``in_chans`` as timm adapts published weights (summed over
    R, G and B for a grayscale model)."""
    from timm.layers import resample_abs_pos_embed
    from timm.models import adapt_input_conv

    from cvt.checkpoint import load
    from cvt.checkpoint.read import read_state_dict
    from cvt.models.cvt import stage_grids

    raw, _, info = read_state_dict(path)
    sd = load.convert_state_dict(raw, model)
    own = model.state_dict()
    head_differs = "head.weight" in sd and sd["head.weight"].shape != own["head.weight"].shape
    stem = sd.get(load.STEM_WEIGHT)  # (embed_dim, in_chans, k, k)
    if (
        stem is not None
        and stem.shape[1] == 3
        and load.differs_in_input_channels(own[load.STEM_WEIGHT].shape, stem.shape)
    ):
        sd[load.STEM_WEIGHT] = adapt_input_conv(model.in_chans, stem)
    size = _recorded_img_size(info)
    learned_at = stage_grids(model.stage_specs, size) if size else None
    for i, stage in enumerate(model.stages):
        key = f"stage{i}.pos_embed"
        if key not in sd or key not in own:
            continue
        if learned_at is None and sd[key].shape == own[key].shape:
            continue  # no recorded size: embeddings that already fit are taken as learned at this grid
        tokens = sd[key].shape[1]  # (1, H*W, C)
        grid = learned_at[i] if learned_at else (math.isqrt(tokens),) * 2  # official files: square inputs
        if grid[0] * grid[1] != tokens:
            raise CheckpointError(
                f"{key} of {path} holds {tokens} position embeddings, which is no {grid[0]}x{grid[1]} grid "
                f"(the grid {'of its recorded input size' if size else 'of a square input'}): cannot "
                f"resize them to the model's {stage.pos_grid[0]}x{stage.pos_grid[1]}"
            )
        if grid != tuple(stage.pos_grid):
            sd[key] = resample_abs_pos_embed(sd[key], list(stage.pos_grid), list(grid), num_prefix_tokens=0)
    load.load_checkpoint(model, sd, strict=True, ignore_head=head_differs, name=path)


def _recorded_img_size(info: dict[str, Any]) -> tuple[int, int] | None:
    """The input size a checkpoint was trained at, where it records one (``cvt train`` checkpoints and
    this project's files; official state dicts do not)."""
    if info.get("train_config", {}).get("img_size"):
        side = int(info["train_config"]["img_size"])  # training runs are square
        return side, side
    if info.get("arch", {}).get("img_size"):
        height, width = info["arch"]["img_size"]
        return int(height), int(width)
    return None


# the signals that stop a run after saving: Ctrl-C, and how job schedulers (SLURM, Kubernetes) and a
# closed terminal stop a process
STOP_SIGNALS = tuple(getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, n))


def _worker_ignores_stop_signals(worker_id: int) -> None:
    """A data-loader worker leaves the stop signals to the training process, which saves and then ends
    it: one sent to the whole process group (Ctrl-C in a terminal, SLURM's SIGTERM) killed the
    workers mid-epoch, and the run with them, before anything was saved."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


class _InterruptFlag:
    """Turns Ctrl-C (SIGINT), SIGTERM and SIGHUP into a flag the loop checks after every step and
    after each epoch's validation and saves, so it can save and stop; a second signal stops at once.

    ``phase`` says which of the two comes next, for the acknowledgement printed (``announce``) when
    the signal arrives. Signal handlers can only be set in the main thread: elsewhere (a thread
    of the caller's) the signals keep their handlers and the flag is never raised.
    """

    def __init__(self, announce: bool = True) -> None:
        self.signum: int | None = None
        self.phase = "step"
        self.announce = announce
        self._previous: dict[int, Any] = {}

    @property
    def raised(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum or signal.SIGINT).name

    def __enter__(self) -> _InterruptFlag:
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.raised:  # a second signal stops at once, without saving
            second = signal.Signals(signum).name
            raise TrainingInterrupted(f"stopped at once by a second {second}, without saving", signum)
        self.signum = signum
        if self.announce:  # os.write: print() may be inside a write of the interrupted code
            when = "after this validation" if self.phase == "validation" else "after this step"
            said = f"{self.name}: stopping {when}, once last.pt is saved (again: at once)\n"
            with contextlib.suppress(OSError):  # SIGHUP: the terminal may be gone
                os.write(2, said.encode())

    def __exit__(self, *exc: object) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)


def _progress_bar(total: int, epoch: int, epochs: int, env: DistEnv) -> Any:
    """A tqdm bar per epoch on rank 0 in a terminal; silent in CI, pipes and other ranks."""
    from tqdm import tqdm

    quiet = not env.is_main or not sys.stderr.isatty() or bool(os.environ.get("CI"))
    return tqdm(
        total=total, desc=f"epoch {epoch + 1}/{epochs}", disable=quiet, leave=False, dynamic_ncols=True
    )


def _copy_buffers(model: nn.Module) -> list[torch.Tensor]:
    """Copies of the model's buffers (BatchNorm running statistics and counts), for a skipped step."""
    return [b.detach().clone() for b in model.buffers()]


@torch.no_grad()
def _restore_buffers(model: nn.Module, copies: list[torch.Tensor]) -> None:
    """Put back the buffers :func:`_copy_buffers` copied."""
    for buffer, copy in zip(model.buffers(), copies, strict=True):
        buffer.copy_(copy)


def _epoch_batches(loader: DataLoader, rng_state: dict[str, Any] | None) -> Iterator[Any]:
    """Iterate ``loader``, restoring ``rng_state`` after its iterator exists (resume: the iterator's
    own set-up must not shift the generators of the interrupted run)."""
    iterator = iter(loader)
    if rng_state is not None:
        restore_rng(rng_state)
    try:
        yield from iterator
    except RuntimeError as err:
        if "DataLoader worker" not in str(err):
            raise
        raise DataLoaderWorkerError(
            f"a data-loader worker died ({first_line(err)}); the OS may have killed it for memory: "
            f"use fewer --workers, or --workers 0 to see any error in the training process"
        ) from err


def apply_gradients(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    clip_grad: float | None,
) -> None:
    """One optimizer update from the accumulated gradients: unscale (fp16's grad scaler), clip the
    global gradient norm to ``clip_grad``, step. Clipping comes after unscaling so that it bounds the
    true gradients, not the scaled ones (2**16 times larger at the scaler's start)."""
    if scaler is not None:
        scaler.unscale_(optimizer)
    if clip_grad:
        nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
    if scaler is not None:
        scaler.step(optimizer)  # skips the update if fp16 gradients overflowed
        scaler.update()
    else:
        optimizer.step()


def train(cfg: TrainConfig, resume: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run a training described by ``cfg`` (continuing ``resume``, a loaded ``last.pt``); returns the summary.

    Raises :class:`~cvt.errors.UsageError` for options that cannot work together or a run folder in
    use by another process (the folder is locked for the whole run), data errors from
    :mod:`cvt.data`, :class:`NonFiniteLossError` on a NaN/Inf loss, and :class:`TrainingInterrupted`
    after saving ``last.pt`` when stopped with Ctrl-C, SIGTERM or SIGHUP.
    """
    env = init_distributed(cfg.device)
    replaced = ReplacedRun(cfg.run_dir)  # what --overwrite sets aside (rank 0)
    with _locked_run_dir(cfg.run_dir, env):
        try:
            return _train(cfg, resume, env, replaced)
        except BaseException:
            replaced.restore()  # failed before its first checkpoint: the run it was to replace comes back
            raise


@contextlib.contextmanager
def _locked_run_dir(run_dir: Path, env: DistEnv) -> Iterator[None]:
    """:func:`~cvt.engine.rundir.lock_run_dir` on rank 0, the one process that writes the folder; a
    refusal stops every rank."""
    if not env.distributed:
        with lock_run_dir(run_dir):
            yield
        return
    with contextlib.ExitStack() as stack:
        refused: CvtError | None = None
        if env.is_main:
            try:
                stack.enter_context(lock_run_dir(run_dir))
            except CvtError as err:
                refused = err
        if any_rank(env, refused is not None):
            raise refused or UsageError(f"run folder {run_dir} is in use by another cvt train (see rank 0)")
        yield


def _train(
    cfg: TrainConfig, resume: dict[str, Any] | None, env: DistEnv, replaced: ReplacedRun
) -> dict[str, Any]:
    """:func:`train` in the locked run folder."""
    from timm.loss import SoftTargetCrossEntropy
    from timm.utils import ModelEmaV3

    from cvt.data import (
        build_dataset,
        build_loader,
        build_mixup,
        build_transform,
        resolve_data_config,
    )
    from cvt.data.datasets import first_difference
    from cvt.data.loader import close_workers, collate_readable
    from cvt.data.seeding import PerSampleSeeds, seed_generators
    from cvt.engine.evaluate import evaluate

    device = env.device
    if cfg.amp == "fp16" and device.type != "cuda":
        raise UsageError("amp fp16 needs a CUDA GPU (its grad scaler is GPU-only); use --amp bf16 on CPU")
    if cfg.sync_bn and device.type != "cuda":
        raise UsageError("sync_bn needs CUDA GPUs (torch's SyncBatchNorm is GPU-only); drop --sync-bn on CPU")
    run_dir = cfg.run_dir
    # a loaded checkpoint may continue in its own folder (or an empty one), never over another run
    resume_from = resume_path(cfg) if resume is not None and cfg.resume else None
    # --resume auto on a run killed before its first checkpoint starts it again, replacing its start-up files
    replace = cfg.overwrite or (cfg.resume == "auto" and resume is None and never_saved(run_dir))
    check_run_dir(run_dir, replace, resume_from)  # every rank, before anyone writes
    if resume_from is not None and not replace:
        check_not_rewinding(resume_from, run_dir, resume)
    if env.distributed:
        torch.distributed.barrier()
    _set_deterministic(cfg.deterministic)

    # ---- data: datasets first (their class count sizes the head), transforms from the model
    aug = augment_config(cfg)
    if env.distributed and not env.is_main:
        torch.distributed.barrier()  # rank 0 reads (and with --download fetches) the data first
    train_set = build_dataset(cfg.dataset, cfg.data_dir, "train", download=cfg.download and env.is_main,
                              skip_bad_images=cfg.skip_bad_images)  # fmt: skip
    # the training classes index the validation labels too (imagefolder: val/ may lack a class, and a
    # class folder unknown to training is refused here, naming it); an unreadable validation image is
    # left out, as cvt eval does, not replaced by the next one counted twice
    val_set = build_dataset(cfg.dataset, cfg.data_dir, "val", skip_bad_images=cfg.skip_bad_images,
                            classes=train_set.classes, replace_bad_images=False)  # fmt: skip
    if env.distributed and env.is_main:
        torch.distributed.barrier()
    classes = list(train_set.classes)
    if resume is not None and resume.get("classes") and list(resume["classes"]) != classes:
        # other names or another order would silently change what each output means
        index, was, now = first_difference(resume["classes"], classes)
        raise CheckpointError(
            f"the checkpoint to resume was trained on other classes than {cfg.dataset} has now: class "
            f"{index} was {was!r}, is {now!r} ({len(resume['classes'])} then, {len(classes)} now); resume "
            f"on the data it was trained on, or start a new run from it with --finetune"
        )
    num_classes = cfg.num_classes or len(classes)
    if num_classes < len(classes):
        raise UsageError(f"num_classes {num_classes} is smaller than the data set's {len(classes)} classes")

    # ---- model (the raw `model` is what checkpoints and evaluation see)
    seed_generators(cfg.seed, cuda=True)  # same initial weights on every rank
    model = _build_model(cfg, num_classes, resuming=resume is not None)
    data_cfg = resolve_data_config(model, cfg.dataset)
    train_set.transform = build_transform(data_cfg, train=True, aug=aug)
    val_set.transform = build_transform(data_cfg, train=False)
    if cfg.train_subset is not None and cfg.train_subset < len(train_set):
        keep = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(cfg.seed))
        train_set = Subset(train_set, keep[: cfg.train_subset].tolist())
    train_set = PerSampleSeeds(train_set, cfg.seed)  # augmentations independent of workers and resumes
    if cfg.sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(device)

    # ---- sampler, optimizer, schedule, loss
    sampler = ResumableSampler(
        len(train_set), cfg.batch_size, env.rank, env.world_size, cfg.seed, cfg.accum_steps
    )
    if sampler.batches_per_epoch == 0:
        raise UsageError(
            f"batch size {cfg.batch_size} x {env.world_size} process(es) x {cfg.accum_steps} accumulation "
            f"step(s) is larger than the training set ({len(train_set)} images): no full step per epoch"
        )
    steps_per_epoch = sampler.batches_per_epoch // cfg.accum_steps
    global_batch = cfg.batch_size * env.world_size * cfg.accum_steps
    lr = effective_lr(cfg, global_batch)
    if cfg.sched == "cosine" and cfg.min_lr > lr:  # without lr_base_batch, validate() said so already
        raise UsageError(
            f"option 'min_lr' {cfg.min_lr:g} is above the peak lr {lr:g} (lr {cfg.lr:g} x global batch "
            f"{global_batch} / lr_base_batch {cfg.lr_base_batch}): the cosine schedule would rise"
        )
    if cfg.warmup_epochs > 0 and cfg.warmup_lr > lr:
        raise UsageError(
            f"option 'warmup_lr' {cfg.warmup_lr:g} is above the peak lr {lr:g} (global batch "
            f"{global_batch}): the warm-up would run downhill; set --warmup-lr below it (official: 1e-6)"
        )
    optimizer = build_optimizer(model, cfg, lr)
    scheduler = build_scheduler(optimizer, cfg, steps_per_epoch)
    scaler = torch.amp.GradScaler("cuda") if cfg.amp == "fp16" else None
    mixup = build_mixup(aug, num_classes)
    if mixup is not None and cfg.batch_size % 2:
        raise UsageError(f"mixup/cutmix need an even batch size, got {cfg.batch_size}")
    if mixup is not None:
        criterion: nn.Module = SoftTargetCrossEntropy()  # mixup's targets are smoothed one-hot vectors
    else:
        criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    pin_memory = device.type == "cuda"  # page-locked batches only where they are copied to a GPU
    val_loader = build_loader(val_set, cfg.eval_batch_size or 2 * cfg.batch_size, train=False,
                              num_workers=cfg.workers, pin_memory=pin_memory, collate_fn=collate_readable,
                              worker_init_fn=_worker_ignores_stop_signals)  # fmt: skip
    amp_dtype = autocast_dtype(cfg.amp)

    # ---- where we are: fresh, or restored from a checkpoint
    progress: dict[str, Any] = dict(
        epoch=0, batches_done=0, step=0, history=[], best_top1=-1.0, best_epoch=0, epoch_loss_sum=0.0,
        epoch_samples=0, train_seconds=0.0, skipped_steps=0,
    )  # fmt: skip
    pending_rng: dict[str, Any] | None = None
    if resume is not None:
        # the optimizer's state (moments, momentum buffers) comes from the checkpoint, its settings
        # (weight decay, momentum, betas …) from this command, as the lr does
        settings = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
        try:
            model.load_state_dict(resume["model"])
            optimizer.load_state_dict(resume["optimizer"])
        except (RuntimeError, ValueError) as err:  # another variant, class count or optimizer
            raise CheckpointError(misfit_message(resume, cfg, model, err)) from err
        for group, own in zip(optimizer.param_groups, settings, strict=True):
            group.update(own)
        if scaler is not None and resume["scaler"]:
            scaler.load_state_dict(resume["scaler"])
        progress.update({k: resume[k] for k in progress if k in resume})
        if progress["epoch"] > cfg.epochs:  # nothing to train; summary.json would say otherwise
            raise UsageError(
                f"the checkpoint to resume has trained {progress['epoch']} epochs already, more than "
                f"--epochs {cfg.epochs}: pass --epochs {progress['epoch']} or more"
            )
        if "best_epoch" not in resume:  # checkpoints of earlier versions: the first epoch of the best top-1
            progress["best_epoch"] = first_epoch_with(progress["history"], progress["best_top1"])
        progress["batches_done"] = resumed_position(resume, progress["batches_done"], cfg, env.world_size)
        # the lr of the resumed step from this run's options, which may change --epochs, --lr, --sched …
        scheduler.step_update(progress["step"])
        if env.is_main:
            pending_rng = resume["rng"]
        else:  # only rank 0's generators were saved: the others get a fresh stream per restart
            seed_generators(cfg.seed + env.rank + 7919 * progress["step"], cuda=True)
    else:
        seed_generators(cfg.seed + env.rank, cuda=True)  # per-rank augmentation and dropout streams

    # ---- EMA and wrappers, after the resumed weights: an EMA first asked for on resume starts from them
    ema = ModelEmaV3(model, decay=cfg.ema_decay) if cfg.ema else None
    if ema is not None and resume is not None and resume["ema"]:
        ema.module.load_state_dict(resume["ema"])
    train_model: nn.Module = model
    if env.distributed:
        ids = [device.index] if device.type == "cuda" else None
        train_model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    ddp = train_model  # for no_sync(), which a compiled wrapper does not expose
    if cfg.compile:
        train_model = torch.compile(train_model)

    if env.is_main:
        # only now, every option checked and the checkpoint loaded: a refused run leaves the folder as it was
        prepare_run_dir(run_dir, replaced if replace else None)
        if resume_from is not None:
            carry_best(resume_from, run_dir, progress)
        write_config(run_dir, config_to_record(cfg, model))
        # the checkpoint's own step keeps its epoch-end scalars; later ones came from the stopped run
        tb = TensorBoardLog(run_dir, purge_step=progress["step"] + 1 if resume else None)
        print(
            f"training {cfg.model} on {cfg.dataset} ({len(train_set)} train / {len(val_set)} val images, "
            f"{num_classes} classes) for {cfg.epochs} epochs: global batch {global_batch}, lr {lr:g}, "
            f"{env.world_size} process(es) on {device.type} → {run_dir}",
            flush=True,
        )

    def save(name: str) -> None:
        state = checkpoint_state(model, optimizer, scaler, ema, cfg, progress, classes, env.world_size)
        atomic_torch_save(state, run_dir / name)
        replaced.discard()  # a checkpoint of the new run: the replaced one goes for good

    def stop(where: str) -> TrainingInterrupted:
        """The interruption to raise once ``last.pt`` holds the state at ``where``."""
        saved = f"saved {run_dir / 'last.pt'} {where}" if env.is_main else f"rank 0 saved last.pt {where}"
        return TrainingInterrupted(f"{saved} ({interrupt.name}); continue with --resume auto",
                                   interrupt.signum or signal.SIGINT)  # fmt: skip

    session_start = time.perf_counter()
    seconds_before = progress["train_seconds"]
    with _InterruptFlag(announce=env.is_main) as interrupt, contextlib.ExitStack() as cleanup:
        cleanup.callback(close_workers, val_loader)  # its workers ignore SIGTERM: end them with the run
        if env.distributed:
            # DDP compares each gradient's strides with its bucket's, size-1 dims included: a depthwise
            # weight's (C, 1, k, k) gradient comes from the conv backward as (k*k, 1, k, 1), the same
            # memory order as the bucket's (k*k, k*k, k, 1), and is copied into it like any other
            cleanup.enter_context(warnings.catch_warnings())
            warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
        for epoch in range(progress["epoch"], cfg.epochs):
            epoch_start = time.perf_counter()
            sampler.set_position(epoch, progress["batches_done"])
            train_set.set_epoch(epoch)
            loader = build_loader(
                train_set, cfg.batch_size, train=True, num_workers=cfg.workers, sampler=sampler,
                seed=cfg.seed * 1_000_003 + epoch, pin_memory=pin_memory,  # seed: the workers' base seeds
                worker_init_fn=_worker_ignores_stop_signals,
            )  # fmt: skip
            train_model.train()
            bar = _progress_bar(len(loader), epoch, cfg.epochs, env)
            window_bad = False  # a non-finite loss in this accumulation window (--skip-nonfinite)
            seen = 0
            for images, targets in _epoch_batches(loader, pending_rng):
                pending_rng = None
                images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
                n = targets.shape[0]
                if mixup is not None:
                    images, targets = mixup(images, targets)
                batch_idx = progress["batches_done"]
                boundary = (batch_idx + 1) % cfg.accum_steps == 0
                # DDP: all-reduce gradients only on the last micro-batch of the window
                sync = boundary or not env.distributed
                # a skipped micro-batch must leave no trace: its forward already moved BatchNorm's
                # running statistics (NaN in, NaN statistics: every later eval would be NaN)
                buffers_before = _copy_buffers(model) if cfg.skip_nonfinite else None
                with ddp.no_sync() if not sync else contextlib.nullcontext(), autocast(device.type, cfg.amp):
                    logits = train_model(images)
                    loss = criterion(logits.float(), targets)
                    finite = bool(torch.isfinite(loss))
                    if any_rank(env, not finite):  # every rank decides together
                        if buffers_before is None:
                            raise NonFiniteLossError(
                                f"non-finite loss ({loss.item()}) at step {progress['step']} "
                                f"(epoch {epoch + 1}, batch {batch_idx}); lower --lr, set --clip-grad, "
                                f"or pass --skip-nonfinite",
                                step=progress["step"],
                            )
                        _restore_buffers(model, buffers_before)
                        window_bad = True
                    else:
                        scaled = loss / cfg.accum_steps
                        (scaler.scale(scaled) if scaler is not None else scaled).backward()
                progress["batches_done"] += 1
                if finite:
                    progress["epoch_loss_sum"] += loss.item() * n
                    progress["epoch_samples"] += n
                seen += n
                if boundary:
                    if window_bad:
                        progress["skipped_steps"] += 1
                        if env.is_main:
                            print(f"skipped step {progress['step']}: non-finite loss", file=sys.stderr)
                    else:
                        apply_gradients(model, optimizer, scaler, cfg.clip_grad)
                        if ema is not None:
                            ema.update(model, step=progress["step"])
                    optimizer.zero_grad(set_to_none=True)
                    window_bad = False
                    progress["step"] += 1
                    scheduler.step_update(progress["step"])  # the lr of the next step
                    if cfg.save_every_steps and progress["step"] % cfg.save_every_steps == 0 and env.is_main:
                        save("last.pt")
                    if any_rank(env, interrupt.raised):
                        if env.is_main:
                            progress["train_seconds"] = seconds_before + time.perf_counter() - session_start
                            save("last.pt")
                        raise stop(f"at step {progress['step']} (epoch {epoch + 1})")
                bar.update(1)
                if bar.n % 10 == 0 or bar.n == bar.total:
                    rate = seen * env.world_size / max(time.perf_counter() - epoch_start, 1e-9)
                    bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}",
                                    img_s=f"{rate:.0f}")  # fmt: skip
            bar.close()

            # ---- end of epoch: validation, checkpoints, logs (a signal now stops after them)
            interrupt.phase = "validation"
            loss_sum, samples = mean_over_ranks(env, [progress["epoch_loss_sum"], progress["epoch_samples"]])
            train_loss = loss_sum / samples if samples else float("nan")
            result = evaluate(model, val_loader, device, amp_dtype=amp_dtype, num_classes=num_classes)
            row = dict(epoch=epoch + 1, train_loss=train_loss, val_loss=result.loss, top1=result.top1,
                       top5=result.top5, lr=optimizer.param_groups[0]["lr"],
                       time=time.perf_counter() - epoch_start)  # fmt: skip
            if ema is not None:
                row["ema_top1"] = evaluate(ema.module, val_loader, device, amp_dtype=amp_dtype).top1
            progress["history"].append(row)
            progress.update(epoch=epoch + 1, batches_done=0, epoch_loss_sum=0.0, epoch_samples=0)
            progress["train_seconds"] = seconds_before + time.perf_counter() - session_start
            is_best = result.top1 > progress["best_top1"]
            if is_best:
                progress.update(best_top1=result.top1, best_epoch=epoch + 1)
            if env.is_main:
                if is_best:
                    save("best.pt")
                save("last.pt")
                write_metrics(run_dir, progress["history"])
                plot_curves(run_dir, progress["history"])
                tb.log({f"train/{k}" if k in ("train_loss", "lr") else f"val/{k}": v
                        for k, v in row.items() if k not in ("epoch", "time")}, progress["step"])  # fmt: skip
                print(
                    f"epoch {epoch + 1}/{cfg.epochs}  train_loss {train_loss:.4f}  "
                    f"val_loss {result.loss:.4f}  top1 {result.top1:.2f}  top5 {result.top5:.2f}  "
                    f"lr {row['lr']:.2e}  {row['time']:.1f}s",
                    flush=True,
                )
            if any_rank(env, interrupt.raised):  # arrived during validation or the saves: stop now
                raise stop(f"at the end of epoch {epoch + 1}")
            interrupt.phase = "step"

    history = progress["history"]
    best_epoch = progress["best_epoch"]  # the epoch best.pt holds
    summary = {
        "best_top1": progress["best_top1"],
        "best_epoch": best_epoch,
        "final_top1": history[-1]["top1"] if history else float("nan"),
        "final_top5": history[-1]["top5"] if history else float("nan"),
        "epochs": cfg.epochs,
        "steps": progress["step"],
        "skipped_steps": progress["skipped_steps"],
        "train_seconds": round(progress["train_seconds"], 2),
        "run_dir": str(run_dir),
    }
    if env.is_main:
        write_summary(run_dir, summary)
        tb.close()
        print(
            f"done: top-1 {summary['final_top1']:.2f}% (best {summary['best_top1']:.2f}% at epoch "
            f"{best_epoch}) in {summary['train_seconds']:.0f} s → {run_dir}",
            flush=True,
        )
    shutdown_distributed(env)
    return summary
