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
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from cvt.engine.config import TrainConfig, augment_config, run_model_kwargs
from cvt.engine.distributed import DistEnv, any_rank, init_distributed, mean_over_ranks, shutdown_distributed
from cvt.engine.optim import build_optimizer, build_scheduler, effective_lr
from cvt.engine.resume import (
    carry_best,
    check_not_rewinding,
    check_same_data,
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

if TYPE_CHECKING:
    from timm.utils import ModelEmaV3

    from cvt.data.seeding import PerSampleSeeds
    from cvt.data.transforms import AugmentConfig


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
    """Load every weight of ``path`` into ``model``; a head of another class count (or none) stays fresh,
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
    # a head of another class count, or none (a backbone saved with num_classes=0), leaves the model's
    fresh_head = "head.weight" not in sd or sd["head.weight"].shape != own["head.weight"].shape
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
    load.load_checkpoint(model, sd, strict=True, ignore_head=fresh_head, name=path)


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


@dataclass
class _Run:
    """What the epochs of a run use and advance, as :func:`_train` built it."""

    cfg: TrainConfig
    env: DistEnv
    replaced: ReplacedRun  # what --overwrite set aside, discarded with the run's first checkpoint
    model: nn.Module  # the raw model: what checkpoints and evaluation see
    train_model: nn.Module  # what the steps call: the model in DDP and torch.compile where asked
    ddp: nn.Module  # for no_sync(), which a compiled wrapper does not expose
    ema: ModelEmaV3 | None
    optimizer: torch.optim.Optimizer
    scheduler: Any  # timm's, stepped per optimizer step
    scaler: torch.amp.GradScaler | None  # fp16's
    mixup: Callable | None  # timm's Mixup, with --mixup or --cutmix
    criterion: nn.Module
    train_set: PerSampleSeeds
    sampler: ResumableSampler
    val_loader: DataLoader
    pin_memory: bool  # the training loaders' (on a GPU)
    classes: list[str]
    num_classes: int
    progress: dict[str, Any]  # the position, the epoch's loss so far, the history: what last.pt records
    # rank 0's generator states of the checkpoint resumed, restored once the first loader's iterator
    # exists; None from the first batch it yields on
    pending_rng: dict[str, Any] | None
    tb: TensorBoardLog | None  # rank 0's; None on the other ranks
    session_start: float = field(default_factory=time.perf_counter)
    seconds_before: float = field(init=False)  # the training time of the sessions before a resume

    def __post_init__(self) -> None:
        self.seconds_before = self.progress["train_seconds"]

    def count_time(self) -> None:
        """Bring ``train_seconds`` up to now: the earlier sessions' time and this one's so far."""
        self.progress["train_seconds"] = self.seconds_before + time.perf_counter() - self.session_start

    def save(self, name: str) -> None:
        """Write the run's state to ``name`` in the run folder (rank 0)."""
        state = checkpoint_state(self.model, self.optimizer, self.scaler, self.ema, self.cfg, self.progress,
                                 self.classes, self.env.world_size, len(self.train_set))  # fmt: skip
        atomic_torch_save(state, self.cfg.run_dir / name)
        self.replaced.discard()  # a checkpoint of the new run: the replaced one goes for good

    def stopped(self, interrupt: _InterruptFlag, where: str) -> TrainingInterrupted:
        """The interruption to raise once ``last.pt`` holds the state at ``where``."""
        last = self.cfg.run_dir / "last.pt"
        saved = f"saved {last} {where}" if self.env.is_main else f"rank 0 saved last.pt {where}"
        return TrainingInterrupted(f"{saved} ({interrupt.name}); continue with --resume auto",
                                   interrupt.signum or signal.SIGINT)  # fmt: skip


def _train(
    cfg: TrainConfig, resume: dict[str, Any] | None, env: DistEnv, replaced: ReplacedRun
) -> dict[str, Any]:
    """:func:`train` in the locked run folder."""
    from cvt.data import build_loader
    from cvt.data.loader import collate_readable
    from cvt.data.seeding import seed_generators

    resume_from, replace = _check_run_options(cfg, resume, env)
    _set_deterministic(cfg.deterministic)

    # ---- data: datasets first (their class count sizes the head), transforms from the model
    aug = augment_config(cfg)
    train_set, val_set, classes, num_classes = _build_datasets(cfg, resume, env)
    model, train_set = _build_model_and_transforms(
        cfg, aug, train_set, val_set, num_classes, resuming=resume is not None, device=env.device
    )

    # ---- sampler, optimizer, schedule, loss
    sampler = _build_sampler(cfg, len(train_set), env)
    global_batch = cfg.batch_size * env.world_size * cfg.accum_steps
    lr = _peak_lr(cfg, global_batch)
    if env.is_main:
        _warn_schedule_settings(cfg, lr)
    optimizer = build_optimizer(model, cfg, lr)
    scheduler = build_scheduler(optimizer, cfg, steps_per_epoch=sampler.batches_per_epoch // cfg.accum_steps)
    scaler = torch.amp.GradScaler("cuda") if cfg.amp == "fp16" else None
    mixup, criterion = _build_loss(cfg, aug, num_classes)
    pin_memory = env.device.type == "cuda"  # page-locked batches only where they are copied to a GPU
    val_loader = build_loader(val_set, cfg.eval_batch_size or 2 * cfg.batch_size, train=False,
                              num_workers=cfg.workers, pin_memory=pin_memory, collate_fn=collate_readable,
                              worker_init_fn=_worker_ignores_stop_signals)  # fmt: skip

    # ---- where we are: fresh, or restored from a checkpoint
    progress: dict[str, Any] = dict(
        epoch=0, batches_done=0, step=0, history=[], best_top1=-1.0, best_epoch=0, epoch_loss_sum=0.0,
        epoch_samples=0, train_seconds=0.0, skipped_steps=0,
    )  # fmt: skip
    pending_rng: dict[str, Any] | None = None
    if resume is not None:
        pending_rng = _restore_resume(
            cfg, resume, env, progress, model, optimizer, scheduler, scaler, len(train_set)
        )
    else:
        seed_generators(cfg.seed + env.rank, cuda=True)  # per-rank augmentation and dropout streams
    ema, train_model, ddp = _wrap_model(cfg, model, resume, env)

    tb = None
    if env.is_main:
        # only now, every option checked and the checkpoint loaded: a refused run leaves the folder as it was
        tb = _open_run_folder(cfg, model, progress, replaced if replace else None, resume_from,
                              resuming=resume is not None)  # fmt: skip
        print(
            f"training {cfg.model} on {cfg.dataset} ({len(train_set)} train / {len(val_set)} val images, "
            f"{num_classes} classes) for {cfg.epochs} epoch{'s' * (cfg.epochs != 1)}: global batch "
            f"{global_batch}, lr {lr:g}, "
            f"{env.world_size} process(es) on {env.device.type} → {cfg.run_dir}",
            flush=True,
        )

    run = _Run(
        cfg=cfg, env=env, replaced=replaced, model=model, train_model=train_model, ddp=ddp, ema=ema,
        optimizer=optimizer, scheduler=scheduler, scaler=scaler, mixup=mixup, criterion=criterion,
        train_set=train_set, sampler=sampler, val_loader=val_loader, pin_memory=pin_memory, classes=classes,
        num_classes=num_classes, progress=progress, pending_rng=pending_rng, tb=tb,
    )  # fmt: skip
    _run_epochs(run)
    summary = _finish(run)
    shutdown_distributed(env)
    return summary


def _check_run_options(
    cfg: TrainConfig, resume: dict[str, Any] | None, env: DistEnv
) -> tuple[Path | None, bool]:
    """Refuse, before any data or model is built, options this device cannot run and a run folder this
    run may not write (every rank checks, before anyone writes). Returns the checkpoint file a resumed
    run continues from (None for a fresh run) and whether the folder's run is to be replaced."""
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
    return resume_from, replace


def _build_datasets(
    cfg: TrainConfig, resume: dict[str, Any] | None, env: DistEnv
) -> tuple[Dataset, Dataset, list[str], int]:
    """The training and validation sets, without transforms (the model decides them), their class names
    (those of the checkpoint resumed, in its order) and the head's class count."""
    from cvt.data import build_dataset
    from cvt.data.datasets import first_difference

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
    return train_set, val_set, classes, num_classes


def _build_model_and_transforms(
    cfg: TrainConfig,
    aug: AugmentConfig,
    train_set: Dataset,
    val_set: Dataset,
    num_classes: int,
    resuming: bool,
    device: torch.device,
) -> tuple[nn.Module, PerSampleSeeds]:
    """The model on ``device`` (the raw one: what checkpoints and evaluation see), with the same initial
    weights on every rank; the data sets get the transforms of its input size and normalisation.
    Returns it and the training set the sampler indexes: cut to --train-subset, seeded per sample."""
    from cvt.data import build_transform, resolve_data_config
    from cvt.data.seeding import PerSampleSeeds, seed_generators

    seed_generators(cfg.seed, cuda=True)  # same initial weights on every rank
    model = _build_model(cfg, num_classes, resuming=resuming)
    data_cfg = resolve_data_config(model, cfg.dataset)
    train_set.transform = build_transform(data_cfg, train=True, aug=aug)
    val_set.transform = build_transform(data_cfg, train=False)
    if cfg.train_subset is not None and cfg.train_subset < len(train_set):
        keep = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(cfg.seed))
        train_set = Subset(train_set, keep[: cfg.train_subset].tolist())
    seeded = PerSampleSeeds(train_set, cfg.seed)  # augmentations independent of workers and resumes
    if cfg.sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(device)
    return model, seeded


def _build_sampler(cfg: TrainConfig, size: int, env: DistEnv) -> ResumableSampler:
    """This rank's share of the ``size`` training images, in whole steps; refused when no step fits."""
    sampler = ResumableSampler(size, cfg.batch_size, env.rank, env.world_size, cfg.seed, cfg.accum_steps)
    if sampler.batches_per_epoch == 0:
        raise UsageError(
            f"batch size {cfg.batch_size} x {env.world_size} process(es) x {cfg.accum_steps} accumulation "
            f"step(s) is larger than the training set ({size} images): no full step per epoch"
        )
    return sampler


def _peak_lr(cfg: TrainConfig, global_batch: int) -> float:
    """The lr after warm-up for ``global_batch`` images a step; refused when the schedule's floor or
    the warm-up's start is above it (known only now: it depends on the process count)."""
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
    return lr


# the decay options and the schedules that read them
_DECAY_OPTIONS = {
    "decay_epochs": ("step",),
    "decay_milestones": ("multistep",),
    "decay_rate": ("step", "multistep"),
}


def _warn_schedule_settings(cfg: TrainConfig, lr: float) -> None:
    """Warn about schedule settings that do nothing: decay options set for a schedule that does not
    read them, a warm-up as long as the run (the lr never reaches its peak ``lr``), step or multistep
    decays at or after the last epoch."""
    defaults = TrainConfig()
    ignored = [
        f"--{name.replace('_', '-')}"
        for name, schedules in _DECAY_OPTIONS.items()
        if cfg.sched not in schedules and getattr(cfg, name) != getattr(defaults, name)
    ]
    if ignored:
        warnings.warn(
            f"{', '.join(ignored)} set, but --sched {cfg.sched} does not read them: ignored",
            stacklevel=3,
        )
    if 0 < cfg.epochs <= cfg.warmup_epochs:
        warnings.warn(
            f"--warmup-epochs {cfg.warmup_epochs:g} is not shorter than --epochs {cfg.epochs}: the lr never "
            f"reaches its peak {lr:g}",
            stacklevel=3,
        )
    if cfg.sched == "multistep":
        late = [m for m in cfg.decay_milestones if m >= cfg.epochs]
    else:
        late = [cfg.decay_epochs] if cfg.sched == "step" and cfg.decay_epochs >= cfg.epochs else []
    if late:
        option = "--decay-milestones" if cfg.sched == "multistep" else "--decay-epochs"
        warnings.warn(
            f"{option} {', '.join(f'{m:g}' for m in late)} at or after --epochs {cfg.epochs}: the lr "
            f"never decays there",
            stacklevel=3,
        )


def _build_loss(cfg: TrainConfig, aug: AugmentConfig, num_classes: int) -> tuple[Callable | None, nn.Module]:
    """timm's Mixup (None without --mixup and --cutmix) and the loss its targets need."""
    from timm.loss import SoftTargetCrossEntropy

    from cvt.data import build_mixup

    mixup = build_mixup(aug, num_classes)
    if mixup is not None:
        criterion: nn.Module = SoftTargetCrossEntropy()  # mixup's targets are smoothed one-hot vectors
    else:
        criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    return mixup, criterion


def _restore_resume(
    cfg: TrainConfig,
    resume: dict[str, Any],
    env: DistEnv,
    progress: dict[str, Any],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: torch.amp.GradScaler | None,
    train_images: int,
) -> dict[str, Any] | None:
    """Load the checkpoint ``resume`` into the model, optimizer, grad scaler and ``progress``, and set
    the lr of its step; ``train_images``: this run's training set size, which must be the checkpoint's.
    Returns rank 0's saved generator states, to restore once the first loader's iterator exists; the
    other ranks' generators are seeded here (None)."""
    from cvt.data.seeding import seed_generators

    # the optimizer's state (moments, momentum buffers) comes from the checkpoint, its settings
    # (weight decay, momentum, betas …) from this command, as the lr does
    settings = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    recorded_optimizer = (resume.get("config") or {}).get("optimizer", cfg.optimizer)
    if recorded_optimizer != cfg.optimizer:  # torch loads any optimizer's state into any other
        raise CheckpointError(misfit_message(resume, cfg, model))
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
    check_same_data(resume, cfg, train_images, mid_epoch=progress["batches_done"] > 0)
    progress["batches_done"] = resumed_position(resume, progress["batches_done"], cfg, env.world_size)
    # the lr of the resumed step from this run's options, which may change --epochs, --lr, --sched …
    scheduler.step_update(progress["step"])
    if env.is_main:
        return resume["rng"]
    # only rank 0's generators were saved: the others get a fresh stream per restart
    seed_generators(cfg.seed + env.rank + 7919 * progress["step"], cuda=True)
    return None


def _wrap_model(
    cfg: TrainConfig, model: nn.Module, resume: dict[str, Any] | None, env: DistEnv
) -> tuple[ModelEmaV3 | None, nn.Module, nn.Module]:
    """The EMA of ``model`` (--ema), and the wrappers the steps call it through: DDP across processes,
    torch.compile. Made after the resumed weights are loaded: an EMA first asked for on resume starts
    from them. Returns the EMA, the model the steps call, and the DDP one (or ``model``)."""
    from timm.utils import ModelEmaV3

    ema = ModelEmaV3(model, decay=cfg.ema_decay) if cfg.ema else None
    if ema is not None and resume is not None and resume["ema"]:
        ema.module.load_state_dict(resume["ema"])
    train_model: nn.Module = model
    if env.distributed:
        device = env.device
        ids = [device.index] if device.type == "cuda" else None
        train_model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    ddp = train_model  # for no_sync(), which a compiled wrapper does not expose
    if cfg.compile:
        train_model = torch.compile(train_model)
    return ema, train_model, ddp


def _open_run_folder(
    cfg: TrainConfig,
    model: nn.Module,
    progress: dict[str, Any],
    replaced: ReplacedRun | None,
    resume_from: Path | None,
    resuming: bool,
) -> TensorBoardLog:
    """Rank 0's start of the run folder: created (the files of a ``replaced`` run set aside), the best
    so far carried over from the checkpoint resumed, ``config.yaml`` written; returns its TensorBoard
    log."""
    run_dir = cfg.run_dir
    prepare_run_dir(run_dir, replaced)
    if resume_from is not None:
        carry_best(resume_from, run_dir, progress)
    if resuming and progress["epoch"] < cfg.epochs:  # a finished run extended: not finished any more
        (run_dir / "summary.json").unlink(missing_ok=True)
    write_config(run_dir, config_to_record(cfg, model))
    # the checkpoint's own step keeps its epoch-end scalars; later ones came from the stopped run
    return TensorBoardLog(run_dir, purge_step=progress["step"] + 1 if resuming else None)


def _run_epochs(run: _Run) -> None:
    """The epochs from the run's position to its last, each trained then ended (:func:`_end_epoch`).
    A stop signal saves ``last.pt`` and raises :class:`TrainingInterrupted`: after the step it
    arrives in, or after the validation and saves it arrives during."""
    from cvt.data.loader import close_workers

    with _InterruptFlag(announce=run.env.is_main) as interrupt, contextlib.ExitStack() as cleanup:
        cleanup.callback(close_workers, run.val_loader)  # its workers ignore SIGTERM: end them with the run
        if run.env.distributed:
            # DDP compares each gradient's strides with its bucket's, size-1 dims included: a depthwise
            # weight's (C, 1, k, k) gradient comes from the conv backward as (k*k, 1, k, 1), the same
            # memory order as the bucket's (k*k, k*k, k, 1), and is copied into it like any other
            cleanup.enter_context(warnings.catch_warnings())
            warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
        for epoch in range(run.progress["epoch"], run.cfg.epochs):
            epoch_start = time.perf_counter()
            _train_epoch(run, epoch, epoch_start, interrupt)
            _end_epoch(run, epoch, epoch_start, interrupt)


def _train_epoch(run: _Run, epoch: int, epoch_start: float, interrupt: _InterruptFlag) -> None:
    """Train ``epoch`` from the run's position in it: a step every ``accum_steps`` batches; a stop
    signal stops after its step, ``last.pt`` saved."""
    from cvt.data import build_loader

    cfg, env, progress = run.cfg, run.env, run.progress
    run.sampler.set_position(epoch, progress["batches_done"])
    run.train_set.set_epoch(epoch)
    loader = build_loader(
        run.train_set, cfg.batch_size, train=True, num_workers=cfg.workers, sampler=run.sampler,
        seed=cfg.seed * 1_000_003 + epoch, pin_memory=run.pin_memory,  # seed: the workers' base seeds
        worker_init_fn=_worker_ignores_stop_signals,
    )  # fmt: skip
    run.train_model.train()
    bar = _progress_bar(len(loader), epoch, cfg.epochs, env)
    window_bad = False  # a non-finite loss in this accumulation window (--skip-nonfinite)
    seen = 0
    for images, targets in _epoch_batches(loader, run.pending_rng):
        run.pending_rng = None
        loss, spoiled = _train_batch(run, images, targets, epoch)
        window_bad = window_bad or spoiled
        seen += targets.shape[0]
        if progress["batches_done"] % cfg.accum_steps == 0:  # the window's last batch
            _optimizer_step(run, window_bad)
            window_bad = False
            if any_rank(env, interrupt.raised):
                if env.is_main:
                    run.count_time()
                    run.save("last.pt")
                raise run.stopped(interrupt, f"at step {progress['step']} (epoch {epoch + 1})")
        bar.update(1)
        if bar.n % 10 == 0 or bar.n == bar.total:
            rate = seen * env.world_size / max(time.perf_counter() - epoch_start, 1e-9)
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{run.optimizer.param_groups[0]['lr']:.2e}",
                            img_s=f"{rate:.0f}")  # fmt: skip
    bar.close()


def _train_batch(
    run: _Run, images: torch.Tensor, targets: torch.Tensor, epoch: int
) -> tuple[torch.Tensor, bool]:
    """Forward and backward one batch of the loader (mixed with mixup/cutmix): its gradients add to the
    accumulation window's, its loss to the epoch's. Returns the loss, and whether a non-finite loss on
    any rank spoiled the window: its step is skipped with --skip-nonfinite, else
    :class:`NonFiniteLossError` stops the run."""
    cfg, env, progress = run.cfg, run.env, run.progress
    device = env.device
    images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
    n = targets.shape[0]
    if run.mixup is not None:
        images, targets = run.mixup(images, targets)
    batch_idx = progress["batches_done"]
    boundary = (batch_idx + 1) % cfg.accum_steps == 0
    # DDP: all-reduce gradients only on the last micro-batch of the window
    sync = boundary or not env.distributed
    # a skipped micro-batch must leave no trace: its forward already moved BatchNorm's
    # running statistics (NaN in, NaN statistics: every later eval would be NaN)
    buffers_before = _copy_buffers(run.model) if cfg.skip_nonfinite else None
    spoiled = False
    with run.ddp.no_sync() if not sync else contextlib.nullcontext(), autocast(device.type, cfg.amp):
        logits = run.train_model(images)
        loss = run.criterion(logits.float(), targets)
        finite = bool(torch.isfinite(loss))
        if any_rank(env, not finite):  # every rank decides together
            if buffers_before is None:
                raise NonFiniteLossError(
                    f"non-finite loss ({loss.item()}) at step {progress['step']} "
                    f"(epoch {epoch + 1}, batch {batch_idx}); lower --lr, set --clip-grad, "
                    f"or pass --skip-nonfinite",
                    step=progress["step"],
                )
            _restore_buffers(run.model, buffers_before)
            spoiled = True
        else:
            scaled = loss / cfg.accum_steps
            (run.scaler.scale(scaled) if run.scaler is not None else scaled).backward()
    progress["batches_done"] += 1
    if finite:
        progress["epoch_loss_sum"] += loss.item() * n
        progress["epoch_samples"] += n
    return loss, spoiled


def _optimizer_step(run: _Run, spoiled: bool) -> None:
    """End an accumulation window: update the weights (and the EMA) with its gradients unless a
    non-finite loss ``spoiled`` it, set the next step's lr, and save ``last.pt`` every
    ``save_every_steps`` steps."""
    cfg, env, progress = run.cfg, run.env, run.progress
    if spoiled:
        progress["skipped_steps"] += 1
        if env.is_main:
            print(f"skipped step {progress['step']}: non-finite loss", file=sys.stderr)
    else:
        apply_gradients(run.model, run.optimizer, run.scaler, cfg.clip_grad)
        if run.ema is not None:
            # the count of updates with this one (skipped steps updated nothing), as timm's train.py
            # passes it: the first copies the weights (ModelEmaV3's decay is 0 up to step 1), every later
            # one averages with decay d
            run.ema.update(run.model, step=progress["step"] - progress["skipped_steps"] + 1)
    run.optimizer.zero_grad(set_to_none=True)
    progress["step"] += 1
    run.scheduler.step_update(progress["step"])  # the lr of the next step
    if cfg.save_every_steps and progress["step"] % cfg.save_every_steps == 0 and env.is_main:
        run.save("last.pt")


def _end_epoch(run: _Run, epoch: int, epoch_start: float, interrupt: _InterruptFlag) -> None:
    """After ``epoch``'s steps: validation (of the EMA too), the history and best so far, then rank 0's
    checkpoints and logs (:func:`_record_epoch`); a stop signal arriving meanwhile stops after them."""
    from cvt.engine.evaluate import evaluate

    cfg, env, progress = run.cfg, run.env, run.progress
    interrupt.phase = "validation"
    loss_sum, samples = mean_over_ranks(env, [progress["epoch_loss_sum"], progress["epoch_samples"]])
    train_loss = loss_sum / samples if samples else float("nan")
    amp_dtype = autocast_dtype(cfg.amp)
    result = evaluate(run.model, run.val_loader, env.device, amp_dtype=amp_dtype, num_classes=run.num_classes)
    row = dict(epoch=epoch + 1, train_loss=train_loss, val_loss=result.loss, top1=result.top1,
               top5=result.top5, lr=run.optimizer.param_groups[0]["lr"],
               time=time.perf_counter() - epoch_start)  # fmt: skip
    if run.ema is not None:
        row["ema_top1"] = evaluate(run.ema.module, run.val_loader, env.device, amp_dtype=amp_dtype).top1
    progress["history"].append(row)
    progress.update(epoch=epoch + 1, batches_done=0, epoch_loss_sum=0.0, epoch_samples=0)
    run.count_time()
    is_best = result.top1 > progress["best_top1"]
    if is_best:
        progress.update(best_top1=result.top1, best_epoch=epoch + 1)
    if env.is_main:
        _record_epoch(run, row, is_best, result.topk)
    if any_rank(env, interrupt.raised):  # arrived during validation or the saves: stop now
        raise run.stopped(interrupt, f"at the end of epoch {epoch + 1}")
    interrupt.phase = "step"


def _record_epoch(run: _Run, row: dict[str, float], is_best: bool, topk: int) -> None:
    """Rank 0's end of an epoch (``row`` of the history): ``best.pt`` when ``is_best``, ``last.pt``,
    metrics.csv, the curves, TensorBoard scalars and a line of output; ``topk``: the k of the row's
    ``top5`` (the evaluation's, min(5, classes))."""
    run_dir, progress = run.cfg.run_dir, run.progress
    if is_best:
        run.save("best.pt")
    run.save("last.pt")
    write_metrics(run_dir, progress["history"])
    plot_curves(run_dir, progress["history"], topk=topk)  # the "top5" column's k: min(5, classes)
    run.tb.log({f"train/{k}" if k in ("train_loss", "lr") else f"val/{k}": v
                for k, v in row.items() if k not in ("epoch", "time")}, progress["step"])  # fmt: skip
    print(
        f"epoch {row['epoch']}/{run.cfg.epochs}  train_loss {row['train_loss']:.4f}  "
        f"val_loss {row['val_loss']:.4f}  top1 {row['top1']:.2f}  top{topk} {row['top5']:.2f}  "
        f"lr {row['lr']:.2e}  {row['time']:.1f}s",
        flush=True,
    )


def _finish(run: _Run) -> dict[str, Any]:
    """The run's summary; rank 0 writes it to ``summary.json``, closes TensorBoard and prints it."""
    from cvt.engine.evaluate import topk_of

    progress, run_dir = run.progress, run.cfg.run_dir
    history = progress["history"]
    best_epoch = progress["best_epoch"]  # the epoch best.pt holds
    summary = {
        "best_top1": progress["best_top1"],
        "best_epoch": best_epoch,
        "final_top1": history[-1]["top1"] if history else float("nan"),
        "final_top5": history[-1]["top5"] if history else float("nan"),
        "topk": topk_of(run.num_classes),  # the k of final_top5 and the "top5" column
        "epochs": run.cfg.epochs,
        "steps": progress["step"],
        "skipped_steps": progress["skipped_steps"],
        "train_seconds": round(progress["train_seconds"], 2),
        "run_dir": str(run_dir),
    }
    if run.env.is_main:
        write_summary(run_dir, summary)
        run.tb.close()
        print(
            f"done: top-1 {summary['final_top1']:.2f}% (best {summary['best_top1']:.2f}% at epoch "
            f"{best_epoch}) in {summary['train_seconds']:.0f} s → {run_dir}",
            flush=True,
        )
    return summary
