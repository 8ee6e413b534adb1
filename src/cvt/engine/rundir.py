"""The run folder: its protection against overwrites, and the logs written into it.

``runs/<name>/`` holds ``config.yaml``, ``metrics.csv``, TensorBoard events (``tb/``), ``curves.png``,
``last.pt``, ``best.pt`` and, once training ends, ``summary.json``. Only rank 0 writes here; every
file is replaced atomically. While a run trains, its process holds an exclusive lock on
``<run>/.lock`` (:func:`lock_run_dir`), so a second ``cvt train`` into the same folder is refused.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from cvt.errors import CvtError, UsageError, first_names
from cvt.figures import new_figure, save_figure
from cvt.fileio import atomic_write_text, check_folder_path, is_temporary_of, read_yaml_mapping

try:
    import fcntl
except ImportError:  # Windows: no flock; runs are not locked there
    fcntl = None  # type: ignore[assignment]

# the files and folders a run writes; --overwrite removes these (in tb/ its event files) and nothing else
RUN_FILES = ("config.yaml", "metrics.csv", "curves.png", "last.pt", "best.pt", "summary.json")
TB_DIR = "tb"
TB_EVENTS = "events.out.tfevents.*"  # the files TensorBoard's writer creates in tb/
STARTUP_FILES = ("config.yaml", TB_DIR)  # written when a run starts, before its first checkpoint
RUN_CHECKPOINTS = ("last.pt", "best.pt")  # the checkpoints a run saves into its folder
METRIC_COLUMNS = ("epoch", "train_loss", "val_loss", "top1", "top5", "lr", "time", "ema_top1")
LOCK_FILE = ".lock"  # held by the process training into the folder; not content of the run
# where --overwrite keeps the replaced run's files until the new run's first checkpoint
REPLACED_DIR = ".replaced"


def is_temporary(name: str) -> bool:
    """Whether ``name`` is the temporary file of a save of a run file that was killed midway."""
    return is_temporary_of(name, RUN_FILES)


def run_dir_content(run_dir: Path) -> list[str]:
    """The names in ``run_dir`` (none when it is no folder), but its lock file: what a user or a run
    put there."""
    return sorted(p.name for p in run_dir.iterdir() if p.name != LOCK_FILE) if run_dir.is_dir() else []


@contextlib.contextmanager
def lock_run_dir(run_dir: Path, command: str = "cvt train") -> Iterator[None]:
    """Hold an exclusive lock on ``<run_dir>/.lock`` (creating the folder) while the block runs.

    A folder locked by another process (a second ``cvt train`` or ``cvt ablate`` into the same
    folder, a ``--resume auto`` of a run still training) is refused with :class:`UsageError`, naming
    the process recorded in the lock file. The lock is the OS's (``flock``): it goes with the process,
    so a killed run leaves at most an unlocked ``.lock`` that the next run takes over. A folder this
    call created is removed again when the block leaves it empty (a run refused before writing). On a
    file system without locks the block runs unlocked, with a warning.
    """
    check_folder_path(run_dir)
    created = [p for p in (run_dir, *run_dir.parents) if not p.exists()]
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CvtError(f"cannot write to the run folder {run_dir}: {err.strerror or err}") from None
    path = run_dir / LOCK_FILE
    try:
        fd = _take_lock(path, run_dir) if fcntl is not None else None
    except BaseException:
        _remove_empty(created)
        raise
    if fd is None:  # no locks here: the run goes on as before there were any
        try:
            yield
        finally:
            _remove_empty(created)
        return
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {command}\n".encode())
        yield
    finally:
        # while still held, so no process can take this file over after the close; only if the name is
        # still ours: a folder moved away during the run may have a new run (and .lock) at its old path
        ours = _same_file(path, fd)
        if ours:
            with contextlib.suppress(OSError):
                path.unlink()
        os.close(fd)  # releases the lock
        if ours:
            _remove_empty(created)


def _same_file(path: Path, fd: int) -> bool:
    """Whether ``path`` still names the file open as ``fd``."""
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except OSError:
        return False


def _take_lock(path: Path, run_dir: Path) -> int | None:
    """An open descriptor of ``path`` holding its exclusive lock; :class:`UsageError` when another
    process holds it; None (warned) on a file system without locks."""
    for _ in range(10):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise CvtError(f"cannot write to the run folder {run_dir}: {err.strerror or err}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").split()
            os.close(fd)
            who = f"{' '.join(holder[1:]) or 'cvt'} (pid {holder[0]})" if holder else "cvt process"
            raise UsageError(
                f"run folder {run_dir} is in use by another {who}: wait for it to end, or choose another "
                f"--output"
            ) from None
        except OSError as err:  # a file system without locks (ENOLCK, EOPNOTSUPP)
            os.close(fd)
            path.unlink(missing_ok=True)
            warnings.warn(
                f"cannot lock the run folder {run_dir} ({err.strerror or err}): a second cvt train into it "
                f"would not be refused",
                stacklevel=4,
            )
            return None
        if _same_file(path, fd):
            return fd
        os.close(fd)  # the holder removed the file between our open and lock: take the new one
    raise UsageError(f"run folder {run_dir} is in use by other cvt processes starting and ending")


def _remove_empty(created: list[Path]) -> None:
    """Remove the folders of ``created`` (deepest first) that are empty."""
    for folder in created:
        try:
            folder.rmdir()
        except OSError:
            return


def never_saved(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds only what a run writes before its first checkpoint: a run killed that
    early, which ``--resume auto`` restarts. That is a ``config.yaml`` recorded by a run (it names the
    model and data set), optionally ``tb/`` and temporary files of a killed save; a folder of anything
    else (a user's own recipe, events or notes) is not one."""
    names = set(run_dir_content(run_dir)) - {REPLACED_DIR}  # a killed --overwrite start keeps it
    temporary = {n for n in names if is_temporary(n)}
    if "config.yaml" not in names or not names - temporary <= set(STARTUP_FILES):
        return False
    recorded = read_recorded_config(run_dir)
    return recorded is not None and {"model", "dataset", "epochs", "seed"} <= recorded.keys()


def read_recorded_config(run_dir: Path) -> dict[str, Any] | None:
    """The options a run recorded in ``run_dir/config.yaml``, or None where there is no readable one
    (missing, not YAML, not a mapping)."""
    try:
        return read_yaml_mapping(run_dir / "config.yaml", "config.yaml", "option: value pairs")
    except UsageError:
        return None


def lies_in(path: Path, folder: Path) -> bool:
    """Whether the name ``path`` is in ``folder`` (the folders resolved, not a link named ``path``)."""
    return path.parent.resolve() == folder.resolve()


def is_own_checkpoint(checkpoint: Path, run_dir: Path) -> bool:
    """Whether ``checkpoint`` is one that the run in ``run_dir`` saved there (its ``last.pt`` or
    ``best.pt``): resuming it continues that folder's run."""
    return checkpoint.name in RUN_CHECKPOINTS and lies_in(checkpoint, run_dir)


def check_run_dir(run_dir: Path, overwrite: bool, resume_from: Path | None = None) -> None:
    """Refuse (touching nothing) a run folder with content unless ``overwrite``, or unless it is the
    run that ``resume_from`` (the checkpoint being continued) continues: that run's own ``last.pt`` or
    ``best.pt``, or a checkpoint alone in its folder. Any other checkpoint (a copy kept beside another
    run's files, or beside a user's) continues only into an empty or new folder, so two runs never mix."""
    if run_dir.exists() and not run_dir.is_dir():
        raise UsageError(f"output {run_dir} exists and is not a folder")
    content = run_dir_content(run_dir)
    if not content or overwrite:
        return
    if resume_from is not None:
        in_folder = lies_in(resume_from, run_dir)
        if is_own_checkpoint(resume_from, run_dir) or (in_folder and content == [resume_from.name]):
            return
        shown = first_names(content, limit=4)
        if in_folder:
            raise UsageError(
                f"run folder {run_dir} holds other files ({shown}) beside {resume_from.name}, not the run "
                f"it continues; continue it in an empty or new --output"
            )
        raise UsageError(
            f"run folder {run_dir} already has content ({shown}) of another run than {resume_from}; "
            f"continue it in its own folder (leave out --output) or in an empty or new --output"
        )
    shown = first_names(content, limit=4)
    if (run_dir / "last.pt").is_file():
        hint = "pass --resume auto to continue it, --overwrite to replace its run files"
    elif never_saved(run_dir):  # a run stopped before its first checkpoint: --resume auto restarts it
        hint = "a run stopped before its first checkpoint: pass --resume auto to restart it"
    else:  # --resume auto finds nothing to continue here: starting afresh would replace the files
        hint = "it has no last.pt to resume; pass --overwrite (not --resume) to replace its run files"
    raise UsageError(
        f"run folder {run_dir} already has content ({shown}); {hint}, or --output/--name for a new folder"
    )


def _run_files(run_dir: Path) -> list[str]:
    """The files of a run in ``run_dir``, relative to it: :data:`RUN_FILES` and the TensorBoard event
    files in ``tb/`` (a user's other files there are not the run's)."""
    names = [name for name in RUN_FILES if (run_dir / name).is_file()]
    if (run_dir / TB_DIR).is_dir():
        names += [f"{TB_DIR}/{p.name}" for p in sorted((run_dir / TB_DIR).glob(TB_EVENTS)) if p.is_file()]
    return names


def _move(name: str, source: Path, target: Path) -> None:
    (target / name).parent.mkdir(parents=True, exist_ok=True)
    os.replace(source / name, target / name)


class ReplacedRun:
    """The run that ``--overwrite`` replaces: its files wait in ``<run>/.replaced/`` until the new run
    saves its first checkpoint (:meth:`discard`; an interrupted run's ``last.pt`` counts) and come back
    if it fails before (:meth:`restore`), so a bad image or a NaN in the first epoch costs no run.

    A ``.replaced/`` that a killed start left (SIGKILL, a preempted job, another rank's failure under
    torchrun) is adopted by the next start while the folder has no checkpoint (the files beside it are
    the killed start's), and removed once it has one (then it is stale).
    """

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.folder = run_dir / REPLACED_DIR
        self.names: list[str] = []  # the files kept aside, relative to both folders; none: nothing to do

    def set_aside(self) -> None:
        """Move the folder's run files into ``.replaced/`` (rank 0, once every option is checked)."""
        if self.folder.is_dir():
            if not any((self.run_dir / name).is_file() for name in RUN_CHECKPOINTS):
                self._delete_new_run_files()  # a killed start's: its replaced run stays aside
                self.names = _run_files(self.folder)
                if self.names:
                    return
            shutil.rmtree(self.folder)  # stale beside a checkpoint, or empty
        moved: list[str] = []
        try:
            for name in _run_files(self.run_dir):
                _move(name, self.run_dir, self.folder)
                moved.append(name)
        except OSError:  # put back what moved (tb/ on another file system, say) before the error shows
            for name in moved:
                _move(name, self.folder, self.run_dir)
            shutil.rmtree(self.folder, ignore_errors=True)
            raise
        self.names = moved

    def discard(self) -> None:
        """Delete the replaced run's files: the new run has a checkpoint."""
        if not self.names:
            return
        self.names = []
        try:
            shutil.rmtree(self.folder)
        except OSError as err:
            warnings.warn(f"cannot delete the replaced run's files in {self.folder}: {err}", stacklevel=2)

    def _delete_new_run_files(self) -> None:
        """Delete the run files in the folder itself: those of the run that was to replace the one aside."""
        for name in _run_files(self.run_dir):
            (self.run_dir / name).unlink()

    def restore(self) -> None:
        """Put the replaced run back, removing what the new run wrote before failing (its ``config.yaml``,
        events …); if that fails, a warning says where the replaced files stay."""
        if not self.names:
            return
        names, self.names = self.names, []
        try:
            self._delete_new_run_files()
            for name in names:
                _move(name, self.folder, self.run_dir)
            shutil.rmtree(self.folder)
        except OSError as err:
            warnings.warn(f"the replaced run's files stay in {self.folder}: {err}", stacklevel=2)


def prepare_run_dir(run_dir: Path, replaced: ReplacedRun | None = None) -> None:
    """Create ``run_dir`` (after :func:`check_run_dir`); with ``replaced`` (``--overwrite``) the files a
    run writes that it holds are set aside (:class:`ReplacedRun`): :data:`RUN_FILES` and the
    TensorBoard event files in ``tb/`` (old events must not mix with the new run's). Anything else (a
    user's notes, other files in ``tb/``) stays.

    Temporary files of a save that was killed midway (``.last.pt.<8 characters>.tmp``) are removed in
    any case.
    """
    try:
        for stale in run_dir_content(run_dir):
            if is_temporary(stale):
                (run_dir / stale).unlink()
        if replaced is not None:
            replaced.set_aside()
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write_test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise CvtError(f"cannot write to the run folder {run_dir}: {err.strerror or err}") from None


def write_config(run_dir: Path, config: dict[str, Any]) -> None:
    """``config.yaml``: every resolved option, loadable again with ``--config``."""
    atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(config, sort_keys=False))


def write_metrics(run_dir: Path, history: list[dict[str, float]]) -> None:
    """``metrics.csv``: one row per finished epoch."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=METRIC_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({k: row.get(k, "") for k in METRIC_COLUMNS})
    atomic_write_text(run_dir / "metrics.csv", text.getvalue())


def write_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    """``summary.json``: the outcome of a finished run."""
    atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")


def plot_curves(run_dir: Path, history: list[dict[str, float]], topk: int = 5) -> None:
    """``curves.png``: train/val loss and val top-1 and top-``topk`` (the ``top5`` column, whose k is
    min(5, classes)) per epoch."""
    epochs = [row["epoch"] for row in history]
    fig = new_figure(figsize=(10, 4))
    ax_loss, ax_acc = fig.subplots(1, 2)
    ax_loss.plot(epochs, [row["train_loss"] for row in history], label="train")
    ax_loss.plot(epochs, [row["val_loss"] for row in history], label="val")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    ax_loss.legend()
    ax_acc.plot(epochs, [row["top1"] for row in history], label="top-1")
    ax_acc.plot(epochs, [row["top5"] for row in history], label=f"top-{topk}")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="validation accuracy")
    ax_acc.legend()
    fig.tight_layout()
    save_figure(fig, run_dir / "curves.png")


class TensorBoardLog:
    """Scalars to TensorBoard event files under ``<run>/tb`` (imported lazily: it is slow)."""

    def __init__(self, run_dir: Path, purge_step: int | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step drops events logged after the resumed checkpoint by the killed run
        self.writer = SummaryWriter(str(run_dir / TB_DIR), purge_step=purge_step)

    def log(self, values: dict[str, float], step: int) -> None:
        """One scalar per key at ``step``."""
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        """Flush and close the event file."""
        self.writer.close()
