"""Ablation results as a Markdown table, a CSV file and a bar plot of top-1 accuracy per variant."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path

from cvt.ablation.runner import AblationRow
from cvt.figures import new_figure, save_figure
from cvt.fileio import atomic_write_text
from cvt.tables import format_table

CSV_COLUMNS: tuple[str, ...] = (
    "family", "variant", "params", "gmacs", "top1", "train_seconds", "paper_params_m", "paper_gflops",
    "paper_top1", "diverged_step", "trained_as",
)  # fmt: skip


def _fmt(value: float | None, spec: str) -> str:
    return "" if value is None else format(value, spec)


def top1_text(row: AblationRow) -> str:
    """A row's top-1 for a table: ``93.6``, ``diverged (step 12)`` when its training diverged, or empty."""
    if row.diverged_step is None:
        return _fmt(row.top1, ".1f")
    return f"diverged (step {row.diverged_step})"


def markdown_table(rows: Sequence[AblationRow], with_results: bool = True) -> str:
    """One line per variant; the paper's CvT-13 ImageNet figures next to the measured ones.

    ``with_results=False`` leaves out the top-1 and training-time columns (dry runs).
    """
    headers = ["family", "variant", "params", "GMACs", "top-1 %", "train s", "paper params M", "paper GFLOPs",
               "paper top-1 %"]  # fmt: skip
    body = [
        [r.family, r.variant, f"{r.params / 1e6:.3f}M", f"{r.gmacs:.4g}", top1_text(r),
         _fmt(r.train_seconds, ".0f"), _fmt(r.paper.params_m, ".1f"), _fmt(r.paper.gflops, ".2f"),
         _fmt(r.paper.top1, ".1f")]
        for r in rows
    ]  # fmt: skip
    if not with_results:
        headers = headers[:4] + headers[6:]
        body = [line[:4] + line[6:] for line in body]
    return format_table(headers, body)


def write_csv(rows: Sequence[AblationRow], path: Path) -> None:
    """All columns of :data:`CSV_COLUMNS`, empty where unknown."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=CSV_COLUMNS)
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if v is None else v for k, v in row.as_dict().items()})
    atomic_write_text(path, text.getvalue())


def plot_top1(rows: Sequence[AblationRow], path: Path, title: str) -> None:
    """Horizontal bars of top-1 per variant, grouped and coloured by family (matplotlib)."""
    from matplotlib import colormaps

    families = list(dict.fromkeys(r.family for r in rows))
    colours = {f: colormaps["tab10"](i % 10) for i, f in enumerate(families)}
    labels = [f"{r.family}: {r.variant}" for r in rows]
    # the axis starts near the lowest top-1 (differences are a few points); a diverged row has no top-1:
    # a zero-length bar at that start, so that its "diverged (step N)" label is inside the axes
    left = max(0.0, min((r.top1 for r in rows if r.top1 is not None), default=0.0) - 10.0)
    values = [left if r.top1 is None else r.top1 for r in rows]
    fig = new_figure(figsize=(8, 0.35 * len(rows) + 1.2))
    ax = fig.subplots()
    bars = ax.barh(range(len(rows)), values, color=[colours[r.family] for r in rows])
    ax.bar_label(bars, labels=[top1_text(r) for r in rows], padding=2, fontsize=8)
    ax.set_yticks(range(len(rows)), labels, fontsize=8)
    ax.invert_yaxis()  # first variant on top, as in the table
    ax.set_xlim(left, 100.0)
    ax.set_xlabel("top-1 accuracy (%)")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)


def write_report(rows: Sequence[AblationRow], out_dir: Path, title: str) -> list[Path]:
    """``ablation.md``, ``ablation.csv`` and ``ablation.png`` in ``out_dir``; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    md, csv_path, png = out_dir / "ablation.md", out_dir / "ablation.csv", out_dir / "ablation.png"
    shared = [f"- {r.label}: the same model as {r.trained_as}, trained once" for r in rows if r.trained_as]
    notes = "\nRows that share a model, in its run folder:\n\n" + "\n".join(shared) + "\n" if shared else ""
    atomic_write_text(md, f"# {title}\n\n{markdown_table(rows)}\n{notes}")
    write_csv(rows, csv_path)
    plot_top1(rows, png, title)
    return [md, csv_path, png]
