"""The ``cvt`` command: parses arguments, calls the library, prints.

Each subcommand lives in its own module ``cvt.cli.<name>`` exposing ``register(subparsers)``,
which adds its parser and sets ``func``; heavy imports happen inside the command, so ``--help``
stays fast. Expected errors (:class:`~cvt.errors.CvtError`) print one line and exit 1 (2 for usage);
``--debug`` shows the full traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from cvt import __version__
from cvt.errors import CvtError

# subcommand modules under cvt.cli, in the order `cvt --help` lists them
COMMAND_MODULES: tuple[str, ...] = ("models", "train", "ablate", "evaluate", "predict", "export", "convert")


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every subcommand registered."""
    parser = argparse.ArgumentParser(
        prog="cvt", description="CvT (Convolutional vision Transformer): models, training, evaluation, tools."
    )
    parser.add_argument("--version", action="version", version=f"cvt {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"cvt.cli.{name}").register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``cvt`` console script; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except CvtError as err:
        if args.debug:
            raise
        print(f"cvt {args.command}: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print(f"cvt {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
