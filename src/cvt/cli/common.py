"""Argument helpers shared by several subcommands."""

from __future__ import annotations

import argparse
import json
import math
from typing import Any


def parse_img_size(text: str) -> tuple[int, int]:
    """``224`` → (224, 224); ``288,224`` or ``288x224`` → (288, 224) as (H, W)."""
    parts = text.replace("x", ",").split(",")
    try:
        sizes = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"image size must be N or H,W, got {text!r}") from None
    if len(sizes) == 1:
        sizes *= 2
    if len(sizes) != 2 or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"image size must be N or H,W with positive values, got {text!r}")
    return sizes[0], sizes[1]


def _finite_or_none(obj: Any) -> Any:
    """``obj`` with every NaN/Inf float (in dicts, lists and tuples) replaced by None."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {key: _finite_or_none(value) for key, value in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite_or_none(value) for value in obj]
    return obj


def json_text(obj: Any) -> str:
    """``obj`` as an indented JSON document; NaN and Inf, which JSON cannot hold, written as null."""
    return json.dumps(_finite_or_none(obj), indent=2, sort_keys=False, allow_nan=False)


def print_json(obj: Any) -> None:
    """Print one JSON document on stdout (see :func:`json_text`)."""
    print(json_text(obj))
