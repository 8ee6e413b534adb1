"""How the C allocator treats freed memory, which decides how often a CPU forward page-faults.

glibc's malloc serves a large block (above a threshold that adapts between 128 KiB and 32 MiB) from a
fresh ``mmap`` region and unmaps it when it is freed, and it trims the top of its heap once more than
twice that threshold lies free there. The next forward then writes to pages the kernel has to map
again: one minor page fault per 4 KiB page. How often that happens depends on the sizes and order of
everything the process allocated before, not on the model alone. On a 2-core Zen 4 VM
(docs/performance.md), one bf16 CvT-13 forward at batch 8 faulted 0 or 6 240 times depending on
what ran before it in the process, transformers' port 28 815 to 37 793 times (alone: 64–88 ms of
kernel time; beside the other implementations its forward took 418–476 ms instead of 286–309).

:func:`keep_freed_memory` stops both: every block comes from the heap and the heap is never trimmed,
so each forward reuses the pages of the one before, as a caching allocator would.
:func:`return_freed_memory` hands what is free back to the kernel at once (a memory baseline).
"""

from __future__ import annotations

import ctypes

from cvt.errors import UsageError

# mallopt parameters, from glibc's <malloc.h>
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4


def glibc() -> ctypes.CDLL | None:
    """The C library this process runs on where it is glibc, else None (macOS, Windows, musl)."""
    try:
        libc = ctypes.CDLL(None)
    except (OSError, TypeError):  # Windows: no process-wide handle (TypeError on some Pythons)
        return None
    return libc if hasattr(libc, "gnu_get_libc_version") else None


def keep_freed_memory() -> None:
    """Keep freed memory in this process for reuse instead of returning it to the kernel.

    Every block is served from the heap (no ``mmap`` of its own) and the heap is never trimmed:
    repeated CPU forwards and training steps reuse the pages of the previous one instead of
    page-faulting fresh ones. What ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=68719476736`` in the
    environment do from the start. Process-wide and for the rest of its life; the resident memory stays
    near its peak.

    Raises :class:`~cvt.errors.UsageError` where the C library is not glibc (its allocator has other
    rules there; jemalloc or tcmalloc through ``LD_PRELOAD`` do the same job).
    """
    libc = glibc()
    if libc is None:
        raise UsageError(
            "keeping freed memory needs glibc's malloc (Linux); this process runs another C library"
        )
    # mallopt(int, int) returns 1 on success, 0 when glibc refuses the value (ctypes passes ints as int)
    if not (libc.mallopt(M_MMAP_MAX, 0) and libc.mallopt(M_TRIM_THRESHOLD, -1)):  # -1: never trim
        raise UsageError("glibc's mallopt refused the thresholds that keep freed memory")


def return_freed_memory() -> None:
    """Hand the memory freed so far back to the kernel where the C library can (glibc's
    ``malloc_trim``; a no-op elsewhere)."""
    libc = glibc()
    if libc is not None:
        libc.malloc_trim(0)
