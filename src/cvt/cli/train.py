"""``cvt train``: one flag per :class:`~cvt.engine.config.TrainConfig` option, then the training loop.

Flags are generated from the dataclass, so a YAML key and its flag always share a name
(``batch_size`` ↔ ``--batch-size``) and help text. Given flags override the YAML recipe
(``--config``), which overrides what a resumed checkpoint recorded; keys in neither keep the
checkpoint's values (:func:`~cvt.engine.resume.resolve_run`).
"""

from __future__ import annotations

import argparse
from collections.abc import Collection, Mapping
from typing import Any

import yaml

from cvt.engine.config import FIELDS, TrainConfig, field_help, field_type, list_item_type
from cvt.engine.rundir import RUN_FILES, TB_DIR, TB_EVENTS
from cvt.errors import UsageError

OVERWRITE_HELP = (
    f"replace the run in an existing run folder: removes its {', '.join(RUN_FILES)} and the TensorBoard "
    f"event files ({TB_EVENTS}) in {TB_DIR}/, nothing else, once the new run saves its first checkpoint "
    f"(an interrupted run's last.pt included); they come back if it fails before (command line only)"
)


def _key_value(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` with VALUE read as YAML (``0.1`` → float, ``[1,2,10]`` → list, ``avg`` → str)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, yaml.safe_load(value)
    except yaml.YAMLError:
        raise argparse.ArgumentTypeError(f"cannot read the value of {text!r}") from None


def add_train_arguments(
    parser: argparse.ArgumentParser,
    hidden: Collection[str] = (),
    defaults: TrainConfig | None = None,
    helps: Mapping[str, str] | None = None,
) -> None:
    """Add ``--config`` and one flag per training option (absent flags stay out of the namespace).

    Options named in ``hidden`` are still parsed (so the command can refuse them with its reason)
    but left out of ``--help``. A command with defaults of its own shows ``defaults``' values, and
    ``helps`` replaces the help text of the options it names.
    """
    parser.add_argument("--config", help="YAML recipe: a file, or a shipped name such as cvt13_in1k")
    own_help = helps or {}
    for name in FIELDS:
        flag = "--" + name.replace("_", "-")
        kind = field_type(name)
        help_text = argparse.SUPPRESS if name in hidden else own_help.get(name) or field_help(name, defaults)
        common: dict[str, Any] = dict(dest=name, default=argparse.SUPPRESS, help=help_text)
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **common)
        elif kind is dict:
            # repeating the flag adds its pairs (a later key wins), where plain nargs would keep the last only
            parser.add_argument(
                flag, action="extend", nargs="+", type=_key_value, metavar="KEY=VALUE", **common
            )
        elif kind is list:
            parser.add_argument(flag, nargs="+", type=list_item_type(name), **common)
        else:
            parser.add_argument(flag, type=kind, metavar=name.upper(), **common)


# options whose empty value stands for their default (recorded so in config.yaml): given empty on the
# command line (`--resume "$RUN"` with RUN unset), a run would silently start afresh, from scratch or
# elsewhere
EMPTY_MEANS_DEFAULT = ("resume", "finetune", "output", "name")


def flags_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The options given on the command line, as ``TrainConfig`` keys and values."""
    flags = {k: v for k, v in vars(args).items() if k in FIELDS}
    for key in EMPTY_MEANS_DEFAULT:
        if flags.get(key) == "":
            raise UsageError(
                f"option {key!r} was given an empty value (an unset shell variable?): give one, or leave "
                f"the option out"
            )
    if "model_args" in flags:
        flags["model_args"] = dict(flags["model_args"])
    return flags


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``train`` subcommand."""
    p = subparsers.add_parser(
        "train",
        help="train or fine-tune a CvT (default: cvt_tiny on the bundled digits, no download)",
        description="Train a CvT. Options come from the defaults, then --config, then these flags; "
        "the run folder (runs/<name>) gets config.yaml, metrics.csv, TensorBoard events, curves.png, "
        "last.pt, best.pt and summary.json. Under torchrun every process runs this command.",
    )
    add_train_arguments(p, helps={"overwrite": OVERWRITE_HELP})
    p.set_defaults(func=run_train)


def run_train(args: argparse.Namespace) -> int:
    """``cvt train``: resolve the run's config and train; the exit status."""
    from cvt.engine.resume import resolve_run
    from cvt.engine.trainer import train

    cfg, checkpoint = resolve_run(args.config, flags_from_args(args))
    train(cfg, checkpoint)
    return 0
