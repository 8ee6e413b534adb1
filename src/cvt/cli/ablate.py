"""``cvt ablate``: the paper's ablations on any model and data set, or their sizes and costs only."""

from __future__ import annotations

import argparse
import os

from cvt.cli.common import print_json
from cvt.cli.train import add_train_arguments, flags_from_args

# cvt train options an ablation cannot honour: every variant has its own run folder under --output,
# named after the variant, and the variants' architectures differ, so no one set of starting weights
# loads into all. Parsed but not in --help, so that giving one gets this reason rather than argparse's
# "unrecognized arguments".
NOT_FOR_ABLATE = {
    "name": "each variant's run folder is named after the variant; choose the ablation's with --output",
    "finetune": "the variants change the architecture (e.g. position embeddings): no one checkpoint fits all",
    "pretrained": "the variants change the architecture (e.g. position embeddings): no published weights fit",
}

# help texts of cvt train options that mean something else here
ABLATE_HELP = {
    "output": "the ablation's folder: the report and one run folder per variant; "
    "default: runs/ablate-<model>-<dataset>",
    "overwrite": "retrain every variant over an earlier ablation in --output, replacing its report",
    "resume": "auto: continue an interrupted ablation in --output with the same options: variants that "
    "finished are kept, an interrupted one continues from its last.pt, the others train; then the report "
    "is written over all",
    "num_classes": "classifier outputs; default: the data set's class count (also in --dry-run)",
}

FAMILY_HELP = (
    "pos_embed (Table 5), token_embed (Table 6), kv_stride (Table 7), conv_proj (Table 8), "
    "proj_method (dw_bn / avg / linear); default: all"
)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``ablate`` subcommand: its own options plus every ``cvt train`` option (the budget)."""
    from cvt.ablation.training import ABLATION_DEFAULTS

    p = subparsers.add_parser(
        "ablate",
        help="run the paper's ablations (position/token embedding, kv stride, conv projection)",
        description="Train every variant of the chosen ablation families with the same budget (any "
        "cvt train option; default: cvt_tiny on digits, 3 epochs each) and write ablation.md, "
        "ablation.csv and ablation.png to --output (default runs/ablate-<model>-<dataset>). "
        "--dry-run prints parameters and GMACs per variant instead, next to the paper's CvT-13 figures.",
    )
    p.add_argument("--family", nargs="+", action="extend", metavar="NAME", help=FAMILY_HELP)
    p.add_argument("--dry-run", action="store_true", help="print params and GMACs per variant, train nothing")
    p.add_argument("--json", action="store_true", help="with --dry-run: print a JSON list")
    add_train_arguments(p, hidden=NOT_FOR_ABLATE, defaults=ABLATION_DEFAULTS, helps=ABLATE_HELP)
    p.set_defaults(func=run_ablate)


def check_ablate_options(args: argparse.Namespace) -> None:
    """Refuse options ``cvt ablate`` would otherwise accept and ignore (:class:`UsageError`)."""
    from cvt.errors import UsageError

    for name, why in NOT_FOR_ABLATE.items():
        if name in vars(args):  # train options given on the command line only
            raise UsageError(f"--{name} does not apply to cvt ablate: {why}")
    if args.json and not args.dry_run:
        raise UsageError("--json needs --dry-run (a training run writes ablation.csv and ablation.md)")
    world_size = os.environ.get("WORLD_SIZE", "1")
    if not args.dry_run and world_size != "1":  # every rank took the folder's lock and refused the others
        raise UsageError(
            f"cvt ablate trains its variants one after another in one process, not under torchrun "
            f"(WORLD_SIZE={world_size}): run it without torchrun, or train each variant of "
            f"`cvt ablate --dry-run` with `torchrun ... -m cvt train --model-args ...`"
        )
    if vars(args).get("resume", "auto") != "auto":
        raise UsageError(
            f"cvt ablate --resume takes auto only (got {args.resume!r}): each variant continues from the "
            f"last.pt in its own run folder under --output"
        )


def run_ablate(args: argparse.Namespace) -> int:
    """``cvt ablate``: the dry-run table, or train every variant and write the report; the exit status."""
    from cvt.ablation import dry_run
    from cvt.ablation.report import markdown_table
    from cvt.ablation.training import ABLATION_DEFAULTS, ablation_dir, class_count, train_ablation
    from cvt.engine.config import resolve_config
    from cvt.engine.rundir import lock_run_dir

    check_ablate_options(args)
    budget = resolve_config(args.config, flags_from_args(args), base=ABLATION_DEFAULTS)
    if not args.dry_run:
        with lock_run_dir(ablation_dir(budget), "cvt ablate"):  # one ablation at a time in a folder
            rows, paths = train_ablation(budget, args.family)
        print(markdown_table(rows))
        print("wrote " + ", ".join(str(p) for p in paths))
        return 0
    # the heads of the models training builds: the data set's class count unless --num-classes
    rows = dry_run(budget.model, args.family, budget.img_size, class_count(budget), budget.model_args)
    if args.json:
        print_json([row.as_dict() for row in rows])
    else:
        print(markdown_table(rows, with_results=False))
    return 0
