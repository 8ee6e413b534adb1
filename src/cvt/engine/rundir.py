"""The run folder: its protection against overwrites, and the logs written into it.

``runs/<name>/`` holds ``config.yaml``, ``metrics.csv``, TensorBoard events (``tb/``), ``curves.png``,
``last.pt``, ``best.pt`` and, once training ends, ``summary.json``. Only rank 0 writes here; every
file is replaced atomically.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path
from typing import Any

import yaml

from cvt.engine.state import atomic_write_bytes, atomic_write_text
from cvt.errors import CvtError, UsageError

# the files and folders a run writes; --overwrite removes these and nothing else
RUN_FILES = ("config.yaml", "metrics.csv", "curves.png", "last.pt", "best.pt", "summary.json")
TB_DIR = "tb"
STARTUP_FILES = ("config.yaml", TB_DIR)  # written when a run starts, before its first checkpoint
METRIC_COLUMNS = ("epoch", "train_loss", "val_loss", "top1", "top5", "lr", "time", "ema_top1")


def never_saved(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds only what a run writes before its first checkpoint: a run killed that
    early, which ``--resume auto`` restarts. That is a ``config.yaml`` recorded by a run (it names the
    model and data set), optionally ``tb/`` and temporary files of a killed save; a folder of anything
    else (a user's own recipe, events or notes) is not one."""
    names = {p.name for p in run_dir.iterdir()} if run_dir.is_dir() else set()
    temporary = {n for n in names if any(n.startswith(f".{f}.") and n.endswith(".tmp") for f in RUN_FILES)}
    if "config.yaml" not in names or not names - temporary <= set(STARTUP_FILES):
        return False
    try:
        recorded = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False
    return isinstance(recorded, dict) and {"model", "dataset", "epochs", "seed"} <= recorded.keys()


def check_run_dir(run_dir: Path, overwrite: bool, resume_from: Path | None = None) -> None:
    """Refuse (touching nothing) a run folder with content unless ``overwrite``, or unless
    ``resume_from`` (the checkpoint being continued) lies in it: another run's checkpoint may only
    continue into an empty or new folder, so two runs never mix."""
    if run_dir.exists() and not run_dir.is_dir():
        raise UsageError(f"output {run_dir} exists and is not a folder")
    content = sorted(p.name for p in run_dir.iterdir()) if run_dir.is_dir() else []
    if not content or overwrite:
        return
    if resume_from is not None and resume_from.resolve().parent == run_dir.resolve():
        return
    shown = ", ".join(content[:4]) + (" …" if len(content) > 4 else "")
    if resume_from is not None:
        raise UsageError(
            f"run folder {run_dir} already has content ({shown}) of another run than {resume_from}; "
            f"continue it in its own folder (leave out --output) or in an empty or new --output"
        )
    if (run_dir / "last.pt").is_file():
        hint = "pass --resume auto to continue it, --overwrite to replace its run files"
    else:  # --resume auto finds nothing to continue here: starting afresh would replace the files
        hint = "it has no last.pt to resume; pass --overwrite (not --resume) to replace its run files"
    raise UsageError(
        f"run folder {run_dir} already has content ({shown}); {hint}, or --output/--name for a new folder"
    )


def prepare_run_dir(run_dir: Path, overwrite: bool) -> None:
    """Create ``run_dir`` (after :func:`check_run_dir`); ``overwrite`` removes the run files it holds.

    Temporary files of a save that was killed midway (``.last.pt.*.tmp``) are removed in any case.
    """
    for name in RUN_FILES:
        for stale in run_dir.glob(f".{name}.*.tmp"):
            stale.unlink()
    if overwrite:
        for name in RUN_FILES:
            (run_dir / name).unlink(missing_ok=True)
    try:
        if overwrite and (run_dir / TB_DIR).exists():
            shutil.rmtree(run_dir / TB_DIR)  # old events must not mix with the new run's
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


def plot_curves(run_dir: Path, history: list[dict[str, float]]) -> None:
    """``curves.png``: train/val loss and val top-1 per epoch."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [row["train_loss"] for row in history], label="train")
    ax_loss.plot(epochs, [row["val_loss"] for row in history], label="val")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    ax_loss.legend()
    ax_acc.plot(epochs, [row["top1"] for row in history], label="top-1")
    ax_acc.plot(epochs, [row["top5"] for row in history], label="top-5")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="validation accuracy")
    ax_acc.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(run_dir / "curves.png", buffer.getvalue())


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
