"""Matplotlib figures written to files, shared by the confusion matrix, the training curves, attention
maps and the ablation report: each is a bare ``matplotlib.figure.Figure`` (no pyplot, so the caller's
backend and figure list are left alone, and no display is needed), rendered in the format named and
written atomically."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from cvt.fileio import atomic_write_bytes


def new_figure(**kwargs: Any) -> Any:
    """A ``matplotlib.figure.Figure(**kwargs)`` outside pyplot: ``matplotlib.use`` switched the caller's
    backend (a notebook's inline display) for the whole process, and pyplot kept every figure open."""
    from matplotlib.figure import Figure

    return Figure(**kwargs)


def figure_bytes(fig: Any, fmt: str = "png", dpi: int = 100) -> bytes:
    """The matplotlib figure ``fig`` rendered as ``fmt`` (named, never guessed from a path)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format=fmt, dpi=dpi)
    return buffer.getvalue()


def save_figure(fig: Any, path: Path, fmt: str = "png", dpi: int = 100) -> None:
    """Render the matplotlib figure ``fig`` as ``fmt`` and write it atomically to ``path`` (its folder
    created): a file already there stays whole if rendering or writing fails."""
    data = figure_bytes(fig, fmt, dpi)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, data)
