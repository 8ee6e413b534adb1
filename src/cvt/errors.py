"""Errors the user can act on.

Every problem caused by input (a wrong model name, a bad checkpoint, an image too small for the
stages) raises a subclass of :class:`CvtError` with one sentence that says what was expected and what
was found. The CLI prints that sentence and exits non-zero; library users can catch the class.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import NoReturn


class CvtError(Exception):
    """Base class of every user-facing error raised by this package (CLI exit code 1)."""

    exit_code = 1


class UsageError(CvtError, ValueError):
    """A bad argument or option value (CLI exit code 2)."""

    exit_code = 2


class InputShapeError(CvtError, ValueError):
    """An input tensor whose channel count or spatial size the model cannot process."""


class CheckpointError(CvtError):
    """A checkpoint that is missing, unreadable, unsafe, or does not fit the model."""


class DataError(CvtError):
    """A data set folder or file that is missing, empty, or unreadable."""


def is_out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` is an allocation failure: CUDA's ``OutOfMemoryError``, Python's ``MemoryError``,
    or the CPU allocator's ``RuntimeError`` ("can't allocate memory"). Checked by name and text, so this
    module stays free of torch (the CLI imports it before any command runs)."""
    if isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError":
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text)


def first_line(err: BaseException) -> str:
    """The first non-blank line of ``err``'s message, or its type's name where it has none."""
    text = str(err).strip()
    return text.splitlines()[0].strip() if text else type(err).__name__


def first_names(names: Sequence[str], limit: int = 5) -> str:
    """``a, b, c`` for a message; longer lists are cut after ``limit`` names, with the count."""
    return ", ".join(names[:limit]) + (f" … ({len(names)} in all)" if len(names) > limit else "")


def per_token_logits_error(model: str, command: str) -> UsageError:
    """The error for ``model`` (its description) with ``global_pool ''``, whose logits are per token,
    where ``command`` needs one score per class and image."""
    return UsageError(
        f"{model} gives logits per token (global_pool ''), not per image: {command} needs a model pooled "
        f"by 'token' or 'avg'"
    )


def run_script(main: Callable[[], int | None], name: str) -> NoReturn:
    """Exit with ``main()``'s status, as a script's ``__main__`` block: a :class:`CvtError` prints one
    line ``<name>: error: ...`` and exits with its code (2 for a usage error), as the CLI does."""
    try:
        status = main()
    except CvtError as err:
        print(f"{name}: error: {first_line(err)}", file=sys.stderr)
        status = err.exit_code
    sys.exit(status)
