"""Plain aligned text tables, also valid Markdown: the CLI's output and the ablation report's."""

from __future__ import annotations

from typing import Any


def format_table(headers: list[str], rows: list[list[Any]]) -> str:
    """A plain aligned text table (also valid Markdown)."""
    cells = [headers, *[[str(c) for c in r] for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)
