"""``cvt ablate``: the paper's ablations on any model and data set, or their sizes and costs only."""

from __future__ import annotations

import argparse

from cvt.cli.common import parse_img_size, print_json

FAMILY_HELP = (
    "pos_embed (Table 5), token_embed (Table 6), kv_stride (Table 7), conv_proj (Table 8), "
    "proj_method (dw_bn / avg / linear); default: all"
)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``ablate`` subcommand."""
    p = subparsers.add_parser(
        "ablate",
        help="run the paper's ablations (position/token embedding, kv stride, conv projection)",
        description="Train every variant of the chosen ablation families with the same budget and write "
        "ablation.md, ablation.csv and ablation.png; --dry-run prints parameters and GMACs only.",
    )
    p.add_argument("--model", default="cvt_tiny", help="base variant (default: cvt_tiny)")
    p.add_argument("--family", nargs="+", metavar="NAME", help=FAMILY_HELP)
    p.add_argument("--img-size", type=parse_img_size, help="input size N or H,W (default: the model's)")
    p.add_argument("--num-classes", type=int, help="classifier outputs (default: the model's, or the data's)")
    p.add_argument("--dry-run", action="store_true", help="print params and GMACs per variant, train nothing")
    p.add_argument("--json", action="store_true", help="with --dry-run: print a JSON list")
    p.set_defaults(func=run_ablate)


def run_ablate(args: argparse.Namespace) -> int:
    from cvt.ablation import dry_run
    from cvt.ablation.report import markdown_table

    if args.dry_run:
        rows = dry_run(args.model, args.family, args.img_size, args.num_classes)
        if args.json:
            print_json([row.as_dict() for row in rows])
        else:
            print(markdown_table(rows, with_results=False))
        return 0
    raise NotImplementedError
