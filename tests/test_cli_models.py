"""`cvt list`, `cvt info` and the CLI's error contract (one line, non-zero exit)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import cvt
from cvt.cli.main import main
from cvt.complexity import count_gmacs


def test_help_lists_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "list" in out and "info" in out


def test_list(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list", "cvt_1*"]) == 0
    assert capsys.readouterr().out.split() == ["cvt_13", "cvt_13_cifar"]
    assert main(["list", "--pretrained", "cvt_w24*"]) == 0
    assert capsys.readouterr().out.split() == ["cvt_w24.msft_in22k_ft_in1k_384"]


def test_info_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "cvt_13", "--img-size", "384", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["params"] == 19_997_480
    assert info["gmacs"] == pytest.approx(16.3, rel=0.02)
    assert info["img_size"] == [384, 384]


def test_info_non_square_and_classes(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "cvt_tiny", "--img-size", "48,32", "--num-classes", "3", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["token_grids"] == [[24, 16], [12, 8], [6, 4]]
    assert info["params"] == cvt.count_params(cvt.create_model("cvt_tiny", num_classes=3))  # a 3-class head


def test_info_table_has_every_variant(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "| cvt_13 " in out and "19.9" not in out and "20.00M" in out
    with torch.device("meta"):  # CvT-W24 at 384 as the table shows it (paper Table 3: 193.2 GFLOPs)
        w24 = count_gmacs(cvt.create_model("cvt_w24"), (384, 384))
    assert w24 == pytest.approx(193.2, rel=0.01) and f"{w24:.2f}" in out


@pytest.mark.parametrize(
    ("argv", "code", "message"),
    [
        (["info", "cvt_14"], 2, "unknown model 'cvt_14'; did you mean"),
        (["info", "cvt_13", "--img-size", "2"], 1, "minimum size is 3x3"),
        (["list", "cvt_99*"], 2, "no model variant matches 'cvt_99*'"),  # it printed nothing, exit 0
        (["list", "--pretrained", "cvt_tiny*"], 2, "no model variant matches 'cvt_tiny*'"),
    ],
)
def test_errors_are_one_line(argv: list[str], code: int, message: str, capsys) -> None:
    assert main(argv) == code
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_bad_option_value_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["info", "cvt_13", "--img-size", "abc"])
    assert exit_info.value.code == 2
    assert "image size must be N or H,W" in capsys.readouterr().err


def test_console_script_runs_as_module() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "cvt", "info", "cvt_99"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 2
    assert result.stderr.strip().startswith("cvt info: error: unknown model 'cvt_99'")


def test_info_table_shows_a_non_square_input_as_height_by_width(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "cvt_tiny", "--img-size", "48,32"]) == 0
    line = next(row for row in capsys.readouterr().out.splitlines() if "cvt_tiny" in row)
    cells = [cell.strip() for cell in line.strip("|").split("|")]
    assert cells == ["cvt_tiny", "48x32", "0.57M", "0.02", "24x16 / 12x8 / 6x4"]
