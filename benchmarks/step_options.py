"""The command-line options of one benchmarked step, shared by ``fast_path_ablation.py``,
``op_census.py``, ``op_times.py`` and ``profile_step.py`` (a script's own folder is on ``sys.path``
when it runs)."""

from __future__ import annotations

import argparse

import torch

from cvt.benchmark import BenchConfig
from cvt.cli.common import parse_img_size


def step_parser(description: str | None) -> argparse.ArgumentParser:
    """A parser with the options of one step: model, input size, mode, batch size and dtype."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="cvt_13")
    parser.add_argument("--img-size", type=parse_img_size,
                        help="input size N or H,W (default: the model's, e.g. 32 for cvt_tiny)")  # fmt: skip
    parser.add_argument("--mode", choices=["infer", "train"], default="infer")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="bf16: CPU autocast")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    return parser


def step_config(args: argparse.Namespace) -> BenchConfig:
    """The CPU :class:`BenchConfig` of :func:`step_parser`'s options; ``--threads`` is applied here."""
    if args.threads:
        torch.set_num_threads(args.threads)
    return BenchConfig(model=args.model, img_size=args.img_size, batch_size=args.batch_size, mode=args.mode,
                       dtype=args.dtype)  # fmt: skip
