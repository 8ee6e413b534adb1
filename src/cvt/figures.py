"""Matplotlib figures written to files: pyplot on the Agg backend (no display needed) and one atomic
write per figure, shared by the confusion matrix, the training curves, attention maps and the
ablation report."""

from __future__ import annotations

import io
from pathlib import Path
from types import ModuleType
from typing import Any

from cvt.fileio import atomic_write_bytes


def pyplot() -> ModuleType:
    """``matplotlib.pyplot`` on the Agg backend: figures render to files only, with or without a display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path, fmt: str = "png", dpi: int = 100) -> None:
    """Render the matplotlib figure ``fig`` as ``fmt`` and write it atomically to ``path`` (its folder
    created): a file already there stays whole if rendering or writing fails. ``fig`` is closed either way."""
    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format=fmt, dpi=dpi)  # the format named, never guessed from the path
    finally:
        pyplot().close(fig)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buffer.getvalue())
