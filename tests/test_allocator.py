"""``cvt.allocator``: keeping freed memory in the process (glibc's mallopt), and refusing where the C
library is not glibc (issue 4: page faults that depend on what ran before a benchmark subject)."""

from __future__ import annotations

import ctypes
import subprocess
import sys
from pathlib import Path

import pytest

from cvt import allocator
from cvt.errors import UsageError

# a fresh process frees a touched 24 MB tensor and prints how much its RSS fell, in MB (by default
# glibc serves a block that large from its own mmap region and unmaps it when freed)
RSS_DROP_AFTER_FREE = """
import os, sys, torch
from cvt import allocator
if sys.argv[1] == "keep":
    allocator.keep_freed_memory()
def rss_mb():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
x = torch.ones(6 * 2**20)
before = rss_mb()
del x
print(before - rss_mb())
"""


def rss_drop_after_free(mode: str) -> float:
    proc = subprocess.run(
        [sys.executable, "-c", RSS_DROP_AFTER_FREE, mode], capture_output=True, text=True, check=True
    )
    return float(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(
    allocator.glibc() is None or not Path("/proc/self/statm").exists(), reason="glibc on Linux only"
)
def test_freed_memory_stays_in_the_process_only_when_kept() -> None:
    assert rss_drop_after_free("default") > 16  # returned to the kernel: touched afresh next time
    assert rss_drop_after_free("keep") < 4  # kept on the heap for the next allocation


def test_keeping_freed_memory_is_refused_without_glibc(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(allocator, "glibc", lambda: None)
    with pytest.raises(UsageError, match="needs glibc's malloc"):
        allocator.keep_freed_memory()
    allocator.return_freed_memory()  # nothing to trim: a no-op, not an error


def test_keeping_freed_memory_reports_a_refused_threshold(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[int, int]] = []

    class RefusingGlibc:
        def mallopt(self, param: int, value: int) -> int:
            calls.append((param, value))
            return 0

    monkeypatch.setattr(allocator, "glibc", RefusingGlibc)
    with pytest.raises(UsageError, match="refused"):
        allocator.keep_freed_memory()
    assert calls == [(allocator.M_MMAP_MAX, 0)]


def test_keeping_freed_memory_turns_off_mmap_and_trimming(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[int, int]] = []

    class Glibc:
        def mallopt(self, param: int, value: int) -> int:
            calls.append((param, value))
            return 1

    monkeypatch.setattr(allocator, "glibc", Glibc)
    allocator.keep_freed_memory()
    # glibc's <malloc.h>: M_MMAP_MAX is -4 (0: no block gets a mapping of its own), M_TRIM_THRESHOLD
    # is -1 (-1, the largest size_t: the heap is never trimmed)
    assert calls == [(-4, 0), (-1, -1)]


def test_glibc_is_found_only_where_the_c_library_is_glibc(monkeypatch: pytest.MonkeyPatch) -> None:
    class Musl:  # a C library without glibc's version function
        def mallopt(self, param: int, value: int) -> int:
            return 1

    monkeypatch.setattr(ctypes, "CDLL", lambda name: Musl())
    assert allocator.glibc() is None
    with pytest.raises(UsageError, match="needs glibc's malloc"):
        allocator.keep_freed_memory()

    def no_process_handle(name: object) -> None:
        raise TypeError("Windows: no handle for None")

    monkeypatch.setattr(ctypes, "CDLL", no_process_handle)
    assert allocator.glibc() is None
