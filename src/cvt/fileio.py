"""Reading and writing files safely: atomic writes (a reader, or a resumed run, sees the old file or the
new one, never half of one), checks before any work is done that an output folder can exist and that no
existing output is replaced unasked, and the one reader of YAML files (recipes, official experiment files).

Shared by checkpoints (``cvt.checkpoint.save_checkpoint``), exports, reports and run folders (``cvt.engine``).
"""

from __future__ import annotations

import os
import re
import secrets
import stat
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cvt.errors import UsageError

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable


def check_folder_path(folder: Path) -> None:
    """:class:`UsageError` when ``folder``, or a folder above it, exists as a file: the output could
    only fail later, with the OS's "File exists" about a path the user did not name as the problem."""
    blocking = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise UsageError(f"cannot write into {folder}: {blocking} is a file, not a folder")


def refuse_existing(
    paths: Iterable[Path], overwrite: bool, option: str = "--overwrite", output: str = "--output"
) -> None:
    """:class:`UsageError` naming those of ``paths`` that exist, unless ``overwrite``: an output is replaced
    only when asked to. The message says the two ways on: choose another ``output`` (the option or
    argument that names it) or pass ``option`` (``--overwrite`` on the command line, ``overwrite=True``
    in the Python API)."""
    existing = [str(p) for p in paths if p.exists()]
    if existing and not overwrite:
        raise UsageError(
            f"refusing to overwrite {', '.join(existing)}: choose another {output} or pass {option}"
        )


# the temporary file of an atomic write: "." + at most 64 characters of the target's name (so a name near
# the file-system limit still has room) + "." + 8 random hex digits + ".tmp"
_TEMPORARY_NAME_CHARS = 64
_TEMPORARY = re.compile(r"^\.(.+)\.[0-9a-f]{8}\.tmp$")


def _temporary_path(path: Path) -> Path:
    """A new random name for the temporary file of an atomic write of ``path``, in its folder."""
    return path.with_name(f".{path.name[:_TEMPORARY_NAME_CHARS]}.{secrets.token_hex(4)}.tmp")


def is_temporary_of(name: str, targets: Iterable[str]) -> bool:
    """Whether the file ``name`` is the temporary file of an atomic write of one of ``targets`` (names
    in the same folder), left by a write that was killed midway."""
    match = _TEMPORARY.match(name)
    return match is not None and any(match[1] == target[:_TEMPORARY_NAME_CHARS] for target in targets)


def _write_temporary(path: Path, data: bytes) -> Path:
    """``data`` in a new, fsynced temporary file beside ``path``; returns the temporary file.

    Its mode is that of a new file under the umask (``open``'s 0666 narrowed by it), or the mode of the
    ``path`` it will replace: a private file stays private.
    """
    for attempt in range(8):  # O_EXCL: a name taken (a killed save's leftover) is never opened
        tmp = _temporary_path(path)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            break
        except FileExistsError:
            if attempt == 7:
                raise
        except OSError as err:  # name the file asked for, not the temporary one
            raise type(err)(err.errno, err.strerror, str(path)) from None
    try:
        if path.is_file():
            os.fchmod(fd, stat.S_IMODE(path.stat().st_mode))
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def atomic_write_files(contents: Mapping[Path, bytes]) -> None:
    """Write several files as one: each goes to a temporary file in its folder (fsynced), and the
    temporary files are renamed over the targets (``os.replace``) only once all of them are written,
    so a failure while writing (a full disk, a kill) leaves every target as it was. The renames
    themselves are one after another: only a kill between two of them (microseconds, no data written)
    leaves some targets new and some old."""
    staged: dict[Path, Path] = {}  # target → its temporary file, until renamed
    try:
        for path, data in contents.items():
            staged[path] = _write_temporary(path, data)
        for path in list(staged):
            os.replace(staged[path], path)
            del staged[path]
    except BaseException:
        for tmp in staged.values():  # those not renamed
            tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder + fsync + ``os.replace``."""
    atomic_write_files({path: data})


def atomic_write_text(path: Path, text: str) -> None:
    """:func:`atomic_write_bytes` for UTF-8 text."""
    atomic_write_bytes(path, text.encode())


def read_yaml_mapping(source: Path | Traversable, name: str, holds: str) -> dict[str, Any]:
    """The mapping at the top of a YAML file (a path, or a file shipped in the package); ``{}`` for an
    empty file.

    Raises :class:`UsageError`, calling the file ``name`` (``config 'x.yaml'``), when it does not exist
    or cannot be read, is not UTF-8 text or not YAML, or holds something other than a mapping
    (``holds`` says what it should hold: ``"option: value pairs"``).
    """
    import yaml

    try:
        data = source.read_bytes()
    except FileNotFoundError:
        raise UsageError(f"{name} does not exist") from None
    except IsADirectoryError:
        raise UsageError(f"{name} is a folder, not a YAML file") from None
    except OSError as err:
        raise UsageError(f"{name} cannot be read: {err.strerror or err}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise UsageError(
            f"{name} is not a YAML file: byte {err.start} is not UTF-8 text (a binary file?)"
        ) from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise UsageError(f"{name} is not valid YAML: {_yaml_problem(err)}") from None
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise UsageError(f"{name} must be a mapping of {holds}, got a YAML {type(doc).__name__}")
    return doc


def _yaml_problem(err: Exception) -> str:
    """A PyYAML error in one line: what is wrong and where (PyYAML's own text spans several lines)."""
    import yaml

    if isinstance(err, yaml.MarkedYAMLError) and err.problem and err.problem_mark is not None:
        return f"{err.problem} at line {err.problem_mark.line + 1}, column {err.problem_mark.column + 1}"
    return " ".join(str(err).split())
