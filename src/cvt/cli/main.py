"""The ``cvt`` command: parses arguments, calls the library, prints.

Each subcommand lives in its own module ``cvt.cli.<name>`` exposing ``register(subparsers)``,
which adds its parser and sets ``func``; heavy imports happen inside the command, so ``--help``
stays fast.

Error contract (``tests/test_cli_errors.py``): expected errors (:class:`~cvt.errors.CvtError`) and
environment failures (``OSError``: a full disk, a folder that cannot be written; running out of
memory) print one line ``cvt <command>: error: ...`` on stderr and exit 1 (2 for usage errors, as
argparse does); any other exception is a bug and prints one ``internal error`` line with a hint;
Ctrl-C exits 130, and a training stopped by a signal 128 + its number (143 for SIGTERM, 129 for SIGHUP),
with one line saying what it saved.
Warnings print as one line ``cvt <command>: warning: ...``. ``--debug`` (before or after the
command) shows the full traceback and Python's own warning format instead.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import os
import re
import signal
import sys
import warnings
from collections.abc import Sequence
from typing import Any, NoReturn

from cvt import __version__
from cvt.errors import CvtError, is_out_of_memory

# subcommand modules under cvt.cli, in the order `cvt --help` lists them
COMMAND_MODULES: tuple[str, ...] = (
    "models", "train", "ablate", "evaluate", "predict", "export", "convert", "bench", "attention",
)  # fmt: skip


class CliParser(argparse.ArgumentParser):
    """argparse under the CLI's error contract: a usage error (an unknown option, a value of the wrong
    type) is one line, ``cvt <command>: error: <message> (see cvt <command> --help)``, exit 2; argparse
    would print the whole usage first (36 lines for ``cvt train``). An option unknown to the command is
    reported by the command's parser, not as ``cvt: error``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.commands: dict[str, argparse.ArgumentParser] = {}  # filled by build_parser on the top level

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def parse_args(self, args: Sequence[str] | None = None, namespace: Any = None) -> argparse.Namespace:
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            command = self.commands.get(getattr(parsed, "command", None) or "", self)
            command.error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed


def build_parser() -> CliParser:
    """The top-level parser with every subcommand registered."""
    parser = CliParser(
        prog="cvt", description="CvT (Convolutional vision Transformer): models, training, evaluation, tools."
    )
    parser.add_argument("--version", action="version", version=f"cvt {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"cvt.cli.{name}").register(subparsers)
    # `cvt train ... --debug` works too (train.py passes its arguments after the command);
    # SUPPRESS keeps the top-level value when the flag is not repeated after the command
    for sub in {id(p): p for p in subparsers.choices.values()}.values():
        sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    parser.commands = dict(subparsers.choices)
    return parser


# how torch's DataLoader re-raises an exception of a worker process: the worker's traceback is
# inside the message, whose last line is "package.ErrorType: the original message"
_WORKER_HEADER = re.compile(r"^Caught \w+ in DataLoader worker process (\d+)\.$")
_QUALIFIED_PREFIX = re.compile(r"^[\w.]+: ")


def one_line(err: BaseException) -> str:
    """The message of ``err`` on one line: the first line, or for an error re-raised from a
    DataLoader worker, the original message (its traceback stays behind ``--debug``)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if not lines:
        return ""
    worker = _WORKER_HEADER.match(lines[0])
    if worker and len(lines) > 1:
        return f"{_QUALIFIED_PREFIX.sub('', lines[-1])} (in data loader worker {worker[1]})"
    return lines[0] + (" [more with --debug]" if len(lines) > 1 else "")


def report_error(command: str, err: Exception) -> int:
    """Print the one-line message for ``err`` raised by ``cvt <command>``; returns the exit code."""
    if isinstance(err, BrokenPipeError):
        # the reader of stdout went away (`cvt list | head`): nothing to say, and nothing more to flush
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    if isinstance(err, CvtError):
        print(f"cvt {command}: error: {one_line(err)}", file=sys.stderr)
        return err.exit_code
    if isinstance(err, OSError):  # the environment, not the code: a full disk, a read-only folder
        print(f"cvt {command}: error: {one_line(err)}", file=sys.stderr)
        return 1
    if is_out_of_memory(err):  # the input, not the code: an image size or batch this machine cannot hold
        line = one_line(err)
        detail = f" ({line})" if line else ""  # a bare MemoryError says nothing
        message = f"out of memory{detail}: use a smaller image size or batch"
        print(f"cvt {command}: error: {message}", file=sys.stderr)
        return 1
    what = ": ".join(filter(None, (type(err).__name__, one_line(err))))
    print(
        f"cvt {command}: internal error: {what} (a bug: rerun with --debug for the traceback and report it)",
        file=sys.stderr,
    )
    return 1


def format_warning(command: str, message: Warning | str, *args: object, **kwargs: object) -> str:
    """``cvt <command>: warning: <message>``: a warning as the CLI prints it (``warnings.formatwarning``
    with the command bound). Formatting only, so code that records warnings still sees them."""
    return f"cvt {command}: warning: {' '.join(str(message).split())}\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``cvt`` console script; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    default_format = warnings.formatwarning
    if not args.debug:  # warnings as one line like errors, not file:line and a line of our source
        warnings.formatwarning = functools.partial(format_warning, args.command)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt as err:  # cvt train's TrainingInterrupted says what it saved, and the signal
        detail = one_line(err)
        with contextlib.suppress(OSError):  # after a hang-up (SIGHUP) the terminal is gone: EIO
            print(f"cvt {args.command}: interrupted" + (f": {detail}" if detail else ""), file=sys.stderr)
        return 128 + int(getattr(err, "signum", signal.SIGINT))
    except Exception as err:
        if args.debug:
            raise
        return report_error(args.command, err)
    finally:
        warnings.formatwarning = default_format


if __name__ == "__main__":
    sys.exit(main())
