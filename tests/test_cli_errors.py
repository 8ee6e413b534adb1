"""The CLI's error contract, across every subcommand (``cvt.cli.main``).

Expected errors print ONE line ``cvt <command>: error: ...`` on stderr and exit 1 (2 for usage
errors); a bug prints one ``internal error`` line that says to rerun with ``--debug``; ``--debug``
(before or after the command) shows the traceback; Ctrl-C exits 130. Per-command messages are
tested by each command's own tests; here one representative failure per command checks the contract.
"""

from __future__ import annotations

import errno
import io
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from cvt.cli.main import build_parser, main, one_line
from cvt.errors import CheckpointError, DataError

REPO = Path(__file__).resolve().parents[1]


def _subparsers() -> dict[str, object]:
    """``{command name: its argparse parser}`` of the installed CLI."""
    return build_parser().commands


COMMANDS = sorted(_subparsers())


def _assert_one_line(err: str, command: str, fragment: str, kind: str = "error") -> None:
    assert err.count("\n") == 1, err
    assert err.startswith(f"cvt {command}: {kind}: "), err
    assert fragment in err, err
    assert "Traceback" not in err


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Small inputs shared by the cases: a `cvt train`-style checkpoint, an image, bad files."""
    from PIL import Image

    from cvt import create_model

    root = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    model = create_model("cvt_tiny", num_classes=10)
    ckpt = root / "best.pt"
    torch.save({"model": model.state_dict(), "config": {"model": "cvt_tiny", "num_classes": 10}}, ckpt)
    Image.new("RGB", (40, 40), (10, 200, 30)).save(root / "img.png")
    (root / "random.pt").write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8).numpy().tobytes())
    (root / "typo.yaml").write_text("epochz: 3\n")
    (root / "a_file").write_text("not a folder")
    (root / "keep.safetensors").write_bytes(b"precious")
    names = {"img": "img.png", "random": "random.pt", "typo": "typo.yaml", "file": "a_file",
             "keep": "keep.safetensors"}  # fmt: skip
    return {"ckpt": ckpt, **{key: root / name for key, name in names.items()}}


# (argv with {placeholders} for `files`, exit code, fragment of the one-line message)
CASES: list[tuple[list[str], int, str]] = [
    (["list", "--no-such-flag"], 2, "unrecognized arguments: --no-such-flag"),
    (["info", "cvt_99"], 2, "unknown model 'cvt_99'"),
    (["train", "--epochs", "0"], 2, "option 'epochs' must be > 0, got 0"),
    (["train", "--config", "{typo}"], 2, "'epochz' (did you mean 'epochs'?)"),
    (["train", "--output", "{file}/run"], 2, "a_file is a file, not a folder"),
    (["train", "--overwrite", "--resume", "auto"], 2, "'overwrite' and 'resume' conflict"),
    (["train", "--resume", "{random}"], 1, "is not a readable PyTorch or safetensors file"),
    (["eval", "--checkpoint", "{random}", "--dataset", "digits"], 1, "is not a readable PyTorch"),
    (
        ["eval", "--checkpoint", "{ckpt}", "--dataset", "imagefolder", "--data-dir", "{file}.none"],
        1,
        "val does not exist; expected",
    ),
    (["predict", "{img}", "--checkpoint", "{file}/nope.pt"], 1, "does not exist"),
    (["predict", "{file}", "--checkpoint", "{ckpt}"], 1, "cannot read image"),
    (["export", "cvt_tiny", "--format", "safetensors", "--output", "{keep}"], 2, "refusing to overwrite"),
    (["convert", "{random}", "--output", "{file}.out"], 1, "is not a readable PyTorch"),
    (["ablate", "--model", "cvt_99", "--dry-run"], 2, "unknown model 'cvt_99'"),
    (["bench", "--model", "cvt_tiny", "--threads", "0"], 2, "--threads must be >= 1, got 0"),
    (["attention", "{file}.png", "--model", "cvt_tiny", "--output", "{file}.png"], 1, "cannot read image"),
    # an output folder under a file: said before any work, not as the OS's "File exists" afterwards
    (
        ["eval", "--output", "{file}/eval", "--checkpoint", "{ckpt}", "--dataset", "digits"],
        2,
        "a_file is a file, not a folder",
    ),
    (["attention", "{img}", "--output", "{file}/maps.png", "--model", "cvt_tiny"], 2, "a_file is a file"),
]


@pytest.mark.parametrize(("argv", "code", "fragment"), CASES, ids=[" ".join(c[0][:3]) for c in CASES])
def test_expected_errors_are_one_line_with_the_exit_code(
    argv: list[str], code: int, fragment: str, files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    if argv[0] not in COMMANDS:
        pytest.skip(f"cvt {argv[0]} is not registered yet")
    argv = [a.format(**{k: str(v) for k, v in files.items()}) for a in argv]
    try:
        result = main(argv)
    except SystemExit as exit_info:  # argparse's own usage errors, on one line as well
        assert exit_info.code == code == 2
        _assert_one_line(capsys.readouterr().err, argv[0], fragment)
    else:
        assert result == code
        _assert_one_line(capsys.readouterr().err, argv[0], fragment)
    assert files["keep"].read_bytes() == b"precious"  # nothing overwritten by a failing command


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["eval", "--bogus"], "cvt eval: error: unrecognized arguments: --bogus (see cvt eval --help)"),
        (["train", "--epochs", "abc"], "cvt train: error: argument --epochs: invalid int value: 'abc'"),
        (["--bogus"], "cvt: error: unrecognized arguments: --bogus (see cvt --help)"),
    ],
)
def test_argparse_errors_are_one_line_naming_the_command(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """argparse prints its whole usage before the error (36 lines for cvt train), and an option the
    command does not know came from the top-level parser as ``cvt: error``."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(message) and captured.err.count("\n") == 1 and not captured.out


def test_every_command_is_covered_here() -> None:
    """A new subcommand must get a row in CASES (its representative error)."""
    assert set(COMMANDS) <= {c[0][0] for c in CASES}


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_and_accepts_debug_after_it(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    sub = _subparsers()[command]
    assert "--debug" in sub._option_string_actions  # `cvt <command> ... --debug`
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert f"usage: cvt {command}" in capsys.readouterr().out


def _fail_with(monkeypatch: pytest.MonkeyPatch, err: BaseException) -> None:
    """Make `cvt list` raise ``err`` from inside the command."""

    def raiser(args: object) -> int:
        raise err

    monkeypatch.setattr("cvt.cli.models.run_list", raiser)


def test_a_bug_prints_one_internal_error_line_with_a_debug_hint(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _fail_with(monkeypatch, RuntimeError("boom\nsecond line of detail"))
    assert main(["list"]) == 1
    err = capsys.readouterr().err
    _assert_one_line(err, "list", "RuntimeError: boom [more with --debug]", kind="internal error")
    assert "rerun with --debug" in err
    _fail_with(monkeypatch, NotImplementedError())  # no message at all: the type alone
    assert main(["list"]) == 1
    err = capsys.readouterr().err
    _assert_one_line(err, "list", "internal error: NotImplementedError (a bug", kind="internal error")


@pytest.mark.parametrize("argv", [["--debug", "list"], ["list", "--debug"]])
def test_debug_lets_the_exception_through(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    _fail_with(monkeypatch, CheckpointError("bad checkpoint"))
    with pytest.raises(CheckpointError, match="bad checkpoint"):
        main(argv)


def test_environment_errors_are_one_line_not_internal(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _fail_with(monkeypatch, OSError(errno.ENOSPC, "No space left on device", "runs/x/last.pt"))
    assert main(["list"]) == 1
    _assert_one_line(capsys.readouterr().err, "list", "No space left on device: 'runs/x/last.pt'")


@pytest.mark.parametrize(
    ("err", "message"),
    [
        (
            RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory"),
            "error: out of memory ([enforce fail",
        ),
        (
            torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
            "error: out of memory (CUDA out of memory. Tried to allocate 2.00 GiB): use a smaller",
        ),
        (MemoryError(), "error: out of memory: use a smaller image size or batch"),  # no empty "()"
    ],
    ids=["cpu-allocator", "cuda", "python"],
)
def test_out_of_memory_is_one_line_not_internal(
    err: BaseException, message: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _fail_with(monkeypatch, err)
    assert main(["list"]) == 1
    _assert_one_line(capsys.readouterr().err, "list", message)


def test_export_of_an_image_size_beyond_memory_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A real allocation failure: the example input alone would need 240 GB."""
    output = tmp_path / "huge.pt"
    argv = ["export", "--model", "cvt_tiny", "--img-size", "100000", "--format", "torchscript"]
    assert main([*argv, "--output", str(output)]) == 1
    _assert_one_line(capsys.readouterr().err, "export", "can't allocate memory")
    assert not output.exists()


def test_a_non_finite_loss_is_one_line_and_exit_1(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    calls = []
    real_cross_entropy = torch.nn.functional.cross_entropy

    def nan_at_third_batch(*args, **kwargs):
        calls.append(1)
        loss = real_cross_entropy(*args, **kwargs)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", nan_at_third_batch)
    argv = ["train", "--img-size", "16", "--train-subset", "64", "--batch-size", "16", "--epochs", "1",
            "--model-args", "embed_dim=[8,16,32]", "depth=[1,1,1]", "num_heads=[1,1,2]",
            "--output", str(tmp_path / "run")]  # fmt: skip
    assert main(argv) == 1
    _assert_one_line(capsys.readouterr().err, "train", "non-finite loss (nan) at step 2")


def test_ctrl_c_exits_130(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    _fail_with(monkeypatch, KeyboardInterrupt())
    assert main(["list"]) == 130
    assert capsys.readouterr().err == "cvt list: interrupted\n"


class _BrokenImages(Dataset):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> torch.Tensor:
        raise DataError(f"cannot read image img{index}.jpg: the file is empty (0 bytes)")


def test_data_loader_worker_error_is_unwrapped_to_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """torch re-raises a worker's exception with the worker's traceback inside its message."""

    def read_in_a_worker(args: object) -> int:
        next(iter(DataLoader(_BrokenImages(), num_workers=1, multiprocessing_context="fork")))
        return 0

    monkeypatch.setattr("cvt.cli.models.run_list", read_in_a_worker)
    assert main(["list"]) == 1
    err = capsys.readouterr().err
    _assert_one_line(err, "list", "img0.jpg: the file is empty (0 bytes) (in data loader worker 0)")


@pytest.mark.slow  # a fresh interpreter imports torch and timm: seconds
def test_seed_script_accepts_debug_and_shows_the_traceback() -> None:
    """``python train.py ... --debug``: the flag comes after the command that train.py prepends."""
    cmd = [sys.executable, str(REPO / "train.py"), "--epochs", "0", "--debug"]
    loud = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=REPO)
    assert loud.returncode == 1  # the interpreter's code for an uncaught exception
    assert "Traceback (most recent call last)" in loud.stderr
    assert loud.stderr.rstrip().endswith("cvt.errors.UsageError: option 'epochs' must be > 0, got 0")


@pytest.mark.slow  # a fresh interpreter imports torch and timm: seconds
def test_closed_stdout_pipe_exits_quietly() -> None:
    """``cvt ... | head``: the reader goes away; no traceback, no 'Exception ignored' noise."""
    script = (
        "import sys\nimport cvt.cli.models as m\n"
        "def flood(args):\n    for _ in range(100000):\n        print('x' * 100)\n"
        "m.run_list = flood\nfrom cvt.cli.main import main\nsys.exit(main(['list']))\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.read(1000)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 1
    assert err == ""


def test_no_command_prints_the_help_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    out = capsys.readouterr().out
    assert out.startswith("usage: cvt ") and "COMMAND" in out
    assert all(name in out for name in ("train", "predict", "bench"))


@pytest.mark.parametrize(
    ("message", "line"),
    [
        ("No space left on device", "No space left on device"),  # one line: nothing left out, no hint
        ("\n\n  weights are stale  \n", "weights are stale"),  # blank lines are not the first line
        ("boom\n\nsecond line of detail", "boom [more with --debug]"),
        (
            "Caught DataError in DataLoader worker process 2.\nOriginal Traceback (most recent call last):\n"
            '  File "loader.py", line 9, in read\ncvt.errors.DataError: cannot read image a.jpg: truncated',
            "cannot read image a.jpg: truncated (in data loader worker 2)",  # no "cvt.errors.DataError: "
        ),
    ],
    ids=["one-line", "blank-lines", "two-lines", "worker"],
)
def test_one_line_is_the_message_the_user_reads(message: str, line: str) -> None:
    assert one_line(RuntimeError(message)) == line


def test_a_command_s_return_value_is_the_exit_code(monkeypatch: pytest.MonkeyPatch) -> None:
    """A command returns its exit status (``None`` meaning 0); main passes it on."""
    for returned, code in ((3, 3), (None, 0)):
        monkeypatch.setattr("cvt.cli.models.run_list", lambda args, value=returned: value)
        assert main(["list"]) == code


def test_warnings_are_one_line_naming_the_command_unless_debug(monkeypatch: pytest.MonkeyPatch) -> None:
    """Warnings print as ``cvt <command>: warning: ...`` on one line while the command runs; --debug keeps
    Python's format (file:line), and either way main puts Python's formatter back when it returns."""
    default = warnings.formatwarning
    formatted: list[str] = []

    def warn(args: object) -> int:
        warning = UserWarning("weights are\n    stale")
        formatted.append(warnings.formatwarning(warning, UserWarning, "w.py", 7))
        return 0

    monkeypatch.setattr("cvt.cli.models.run_list", warn)
    assert main(["list"]) == 0
    assert formatted == ["cvt list: warning: weights are stale\n"]
    assert warnings.formatwarning is default
    assert main(["list", "--debug"]) == 0
    assert formatted[1] == "w.py:7: UserWarning: weights are\n    stale\n"
    assert warnings.formatwarning is default


class _Hangup(KeyboardInterrupt):
    """What cvt train raises when a SIGHUP stops it (its TrainingInterrupted)."""

    signum = signal.SIGHUP


class _GoneTerminal(io.StringIO):
    """stderr after a hang-up: the terminal is gone, every write fails with EIO."""

    def write(self, text: str) -> int:
        raise OSError(errno.EIO, "Input/output error")


def test_hangup_with_the_terminal_gone_still_exits_129(monkeypatch: pytest.MonkeyPatch) -> None:
    """The line saying what was saved cannot be printed; the exit status must still say SIGHUP."""
    _fail_with(monkeypatch, _Hangup("saved runs/x/last.pt (epoch 3)"))
    monkeypatch.setattr(sys, "stderr", _GoneTerminal())
    assert main(["list"]) == 129


@pytest.mark.parametrize("num_classes", ["3", "0"])  # 0 (a headless model) is a class count too
def test_num_classes_with_a_checkpoint_is_a_usage_error(
    num_classes: str, files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The checkpoint brings its own classifier: --num-classes would be silently ignored."""
    output = tmp_path / "m.safetensors"
    argv = ["export", "--checkpoint", str(files["ckpt"]), "--num-classes", num_classes]
    assert main([*argv, "--format", "safetensors", "--output", str(output)]) == 2
    assert capsys.readouterr().err == (
        "cvt export: error: --num-classes applies to a model built by name; a checkpoint brings its own "
        "classifier\n"
    )
    assert not output.exists()
