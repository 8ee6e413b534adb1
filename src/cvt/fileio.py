"""Writing files safely: atomic writes (a reader, or a resumed run, sees the old file or the new one,
never half of one) and a check that an output folder can exist before any work is done.

Shared by checkpoints (``cvt.checkpoint.save_checkpoint``), exports, reports and run folders (``cvt.engine``).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from cvt.errors import UsageError


def check_folder_path(folder: Path) -> None:
    """:class:`UsageError` when ``folder``, or a folder above it, exists as a file: the output could
    only fail later, with the OS's "File exists" about a path the user did not name as the problem."""
    blocking = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise UsageError(f"cannot write into {folder}: {blocking} is a file, not a folder")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder + fsync + ``os.replace``."""
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as err:  # name the file asked for, not the temporary one
        raise type(err)(err.errno, err.strerror, str(path)) from None
    try:
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; written files are as readable as any other
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
