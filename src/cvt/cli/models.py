"""``cvt list`` and ``cvt info``: the registered variants, their size and cost."""

from __future__ import annotations

import argparse

from cvt.cli.common import parse_img_size, print_json
from cvt.tables import format_table


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``list`` and ``info`` subcommands."""
    p = subparsers.add_parser("list", help="list model variants (and pretrained tags)")
    p.add_argument("pattern", nargs="?", default="", help="wildcard filter, e.g. 'cvt_1*'")
    p.add_argument("--pretrained", action="store_true", help="list pretrained tags (arch.tag)")
    p.set_defaults(func=run_list)

    p = subparsers.add_parser("info", help="parameters and GMACs of a variant (all variants if omitted)")
    p.add_argument("model", nargs="?", help="variant name, e.g. cvt_13 (default: a table of all)")
    p.add_argument("--img-size", type=parse_img_size, help="input size N or H,W (default: the variant's)")
    p.add_argument("--num-classes", type=int, help="classifier outputs (default: the variant's)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run_info)


def run_list(args: argparse.Namespace) -> int:
    """``cvt list``: print the variant names; the exit status."""
    from cvt.errors import UsageError
    from cvt.models import list_models

    names = list_models(args.pattern, pretrained=args.pretrained)
    if not names:  # a typo printed nothing and exited 0
        raise UsageError(f"no model variant matches {args.pattern!r}; `cvt list` shows them all")
    for name in names:
        print(name)
    return 0


def run_info(args: argparse.Namespace) -> int:
    """``cvt info``: print a variant's (or every variant's) parameters and GMACs; the exit status."""
    import torch

    from cvt.complexity import complexity
    from cvt.models import create_model, list_models

    names = [args.model] if args.model else list_models()
    rows = []
    for name in names:
        with torch.device("meta"):  # shapes only: counting needs no weights (CvT-W24 in a second)
            model = create_model(name, num_classes=args.num_classes).eval()
        info = complexity(model, args.img_size)
        rows.append({"model": name, **info.as_dict()})
    if args.json:
        print_json(rows[0] if args.model else rows)
        return 0
    table = [
        [r["model"], "x".join(map(str, r["img_size"])), f"{r['params'] / 1e6:.2f}M", f"{r['gmacs']:.2f}",
         " / ".join(f"{h}x{w}" for h, w in r["token_grids"])]
        for r in rows
    ]  # fmt: skip
    print(format_table(["model", "input", "params", "GMACs", "token grids"], table))
    return 0
