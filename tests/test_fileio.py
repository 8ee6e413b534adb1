"""``cvt.fileio``: atomic writes of several files, and the one YAML reader; ``cvt.figures``' figure writes."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch

from cvt import fileio
from cvt.errors import UsageError
from cvt.figures import new_figure, save_figure
from cvt.fileio import (
    atomic_write_bytes,
    atomic_write_files,
    atomic_write_text,
    check_folder_path,
    is_temporary_of,
    read_yaml_mapping,
    refuse_existing,
)


def _fsync_failing_on_call(monkeypatch: pytest.MonkeyPatch, failing_call: int) -> None:
    """``os.fsync`` raising ENOSPC (a full disk) on its ``failing_call``-th call."""
    real_fsync, calls = os.fsync, []

    def fsync(fd: int) -> None:
        calls.append(fd)
        if len(calls) == failing_call:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)


def test_atomic_write_files_replaces_no_target_when_one_write_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second = tmp_path / "a.json", tmp_path / "b.bin"
    atomic_write_files({first: b"old a", second: b"old b"})
    _fsync_failing_on_call(monkeypatch, 2)  # the second file's
    with pytest.raises(OSError, match="No space left"):
        atomic_write_files({first: b"new a", second: b"new b"})
    assert (first.read_bytes(), second.read_bytes()) == (b"old a", b"old b")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.bin"]  # no temporary file left


def test_atomically_written_files_get_the_mode_of_any_new_file_or_keep_the_replaced_ones(
    tmp_path: Path,
) -> None:
    """mkstemp's 0600 hid a report from other users; then a fixed 0644 ignored a umask of 077 and
    opened a private checkpoint to everyone when it was replaced."""
    previous = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644
        os.umask(0o077)
        atomic_write_text(tmp_path / "private.txt", "x")
        assert (tmp_path / "private.txt").stat().st_mode & 0o777 == 0o600
        os.umask(0o022)
        atomic_write_text(tmp_path / "private.txt", "replaced")  # keeps its own mode
        assert (tmp_path / "private.txt").stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(previous)


def test_a_target_name_near_the_file_system_limit_can_be_written(tmp_path: Path) -> None:
    """The temporary file beside it was named '.<whole name>.XXXXXXXX.tmp', 14 characters longer:
    'File name too long' for a name `touch` accepts."""
    path = tmp_path / ("a" * 250 + ".png")
    atomic_write_bytes(path, b"png")
    assert path.read_bytes() == b"png" and [p.name for p in tmp_path.iterdir()] == [path.name]


def test_the_temporary_files_of_a_write_are_told_apart_by_their_target(tmp_path: Path) -> None:
    """What a killed save leaves is found for its own target only (run folders delete these)."""
    for target in ("last.pt", "a" * 250 + ".png"):
        left = fileio._temporary_path(tmp_path / target).name
        assert is_temporary_of(left, [target]) and is_temporary_of(left, ["x", target])
        assert not is_temporary_of(left, ["best.pt"]) and not is_temporary_of(left, [])
    assert not is_temporary_of(".last.pt.mine.tmp", ["last.pt"])  # a user's file of a similar name
    assert not is_temporary_of(".last.pt.3fa9c2d1.tmp.bak", ["last.pt"])
    assert not is_temporary_of(".last.pt.3fa9c2.tmp", ["last.pt"])  # 8 hex digits, no other count


def test_check_folder_path_names_a_file_in_the_way_at_any_depth(tmp_path: Path) -> None:
    blocking = tmp_path / "file"
    blocking.write_text("x")
    for folder in (blocking, blocking / "run", blocking / "a" / "b"):
        with pytest.raises(UsageError, match=f"cannot write into {folder}: {blocking} is a file"):
            check_folder_path(folder)
    check_folder_path(tmp_path / "new" / "run")  # folders that do not exist yet are fine


def test_refuse_existing_names_every_existing_output_and_the_ways_on(tmp_path: Path) -> None:
    a, b, new = tmp_path / "a.json", tmp_path / "b.png", tmp_path / "new.json"
    a.write_text("{}")
    b.write_bytes(b"png")
    with pytest.raises(UsageError) as refused:
        refuse_existing([a, new, b], overwrite=False)
    assert (
        str(refused.value) == f"refusing to overwrite {a}, {b}: choose another --output or pass --overwrite"
    )
    assert refused.value.exit_code == 2  # the CLI's exit code of a usage error
    with pytest.raises(UsageError) as refused:
        refuse_existing([a], overwrite=False, option="overwrite=True", output="path")
    assert str(refused.value) == f"refusing to overwrite {a}: choose another path or pass overwrite=True"
    refuse_existing([a, b], overwrite=True)
    refuse_existing([new, tmp_path / "missing" / "x"], overwrite=False)  # nothing exists: nothing to refuse


def test_a_write_takes_another_temporary_name_when_one_is_taken(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A killed save's leftover under the random name drawn is neither opened nor a failure; only when
    all 8 names drawn are taken does the write give up."""
    left = tmp_path / ".last.pt.00000000.tmp"
    left.write_bytes(b"leftover")
    drawn = iter(["00000000", "00000000", "0000000a"])
    monkeypatch.setattr(fileio.secrets, "token_hex", lambda nbytes: next(drawn))
    atomic_write_bytes(tmp_path / "last.pt", b"new")
    assert (tmp_path / "last.pt").read_bytes() == b"new" and left.read_bytes() == b"leftover"
    monkeypatch.setattr(fileio.secrets, "token_hex", lambda nbytes: "00000000")
    with pytest.raises(FileExistsError):
        atomic_write_bytes(tmp_path / "last.pt", b"newer")
    assert (tmp_path / "last.pt").read_bytes() == b"new"


def test_a_write_that_cannot_start_names_the_target_not_its_temporary_file(tmp_path: Path) -> None:
    target = tmp_path / "missing" / "last.pt"
    with pytest.raises(FileNotFoundError) as err:
        atomic_write_bytes(target, b"x")
    assert err.value.filename == str(target) and err.value.errno == errno.ENOENT
    assert str(err.value) == f"[Errno {errno.ENOENT}] No such file or directory: '{target}'"


def test_atomic_write_text_is_utf8(tmp_path: Path) -> None:
    path = tmp_path / "t.md"
    atomic_write_text(path, "CvT — 93.6 %\n")
    assert path.read_bytes() == "CvT — 93.6 %\n".encode()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, r"^the file does not exist$"),
        (b"\x89PNG\r\n\x1a\n\x00\xff", r"^the file is not a YAML file: byte 0 is not UTF-8 text"),
        (b"a: 1\n\x00\n", r"^the file is not valid YAML: unacceptable character #x0000"),
        (b"epochs: [1\n", r"^the file is not valid YAML: expected ',' or ']', .* at line 2, column 1$"),
        (b"- 1\n- 2\n", r"^the file must be a mapping of option: value pairs, got a YAML list$"),
        (b"just text\n", r"^the file must be a mapping of option: value pairs, got a YAML str$"),
    ],
)
def test_read_yaml_mapping_errors_are_one_usage_error_line(
    tmp_path: Path, content: bytes | None, message: str
) -> None:
    path = tmp_path / "f.yaml"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(UsageError, match=message) as err:
        read_yaml_mapping(path, "the file", "option: value pairs")
    assert "\n" not in str(err.value)


def test_read_yaml_mapping_reads_mappings_and_empty_files(tmp_path: Path) -> None:
    path = tmp_path / "f.yaml"
    path.write_text("epochs: 3\nname: é\n", encoding="utf-8")
    assert read_yaml_mapping(path, "f", "options") == {"epochs": 3, "name": "é"}
    path.write_text("")
    assert read_yaml_mapping(path, "f", "options") == {}
    with pytest.raises(UsageError, match="^f is a folder, not a YAML file$"):
        read_yaml_mapping(tmp_path, "f", "options")


def test_save_figure_writes_the_named_format_and_keeps_the_file_when_rendering_fails(tmp_path):
    fig = new_figure()
    fig.subplots().plot([0, 1], [1, 0])
    path = tmp_path / "new" / "plot.png"
    save_figure(fig, path)
    assert path.read_bytes().startswith(b"\x89PNG")
    save_figure(new_figure(), tmp_path / "plot.jpeg", fmt="pdf")  # the format named, not the suffix's
    assert (tmp_path / "plot.jpeg").read_bytes().startswith(b"%PDF")
    with pytest.raises(ValueError, match="not supported"):
        save_figure(new_figure(), path, fmt="nope")  # rendering fails: the earlier plot stays
    assert path.read_bytes().startswith(b"\x89PNG")


def test_figures_leave_the_callers_matplotlib_backend_and_figures_alone(tmp_path):
    """The curves and the confusion matrix switched the process to Agg (``matplotlib.use``), which
    ends a notebook's inline display, and went through pyplot's list of open figures."""
    import matplotlib
    import matplotlib.pyplot as plt

    from cvt.engine.evaluate import save_confusion_png
    from cvt.engine.rundir import plot_curves

    before = matplotlib.get_backend()
    matplotlib.use("svg")
    try:
        mine = plt.figure()
        history = [
            dict(epoch=e, train_loss=1.0 / e, val_loss=1.2 / e, top1=50.0 + e, top5=90.0) for e in (1, 2)
        ]
        plot_curves(tmp_path, history)
        save_confusion_png(torch.tensor([[3, 1], [0, 4]]), ["a", "b"], tmp_path / "confusion.png")
        assert matplotlib.get_backend() == "svg" and plt.get_fignums() == [mine.number]
        for name in ("curves.png", "confusion.png"):
            assert (tmp_path / name).read_bytes().startswith(b"\x89PNG")
    finally:
        plt.close("all")
        matplotlib.use(before)
