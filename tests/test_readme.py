"""The README's Python example runs as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def test_python_api_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    text = README.read_text(encoding="utf-8")
    example = re.search(r"## Python API\n+```python\n(.*?)```", text, flags=re.S)
    assert example, "README has no Python API example"
    monkeypatch.chdir(tmp_path)  # the example writes cvt13.safetensors
    exec(compile(example.group(1), "README.md", "exec"), {})
    assert (tmp_path / "cvt13.safetensors").stat().st_size > 70_000_000  # 20M fp32 parameters
    assert "cvt_13" in capsys.readouterr().out
