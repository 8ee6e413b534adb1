"""The README's Python example runs as written; the tests and ``cvt`` flags the docs cite exist."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from cvt.cli.main import build_parser

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = [README, *sorted((REPO / "docs").glob("*.md"))]


def test_python_api_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    text = README.read_text(encoding="utf-8")
    example = re.search(r"## Python API\n+```python\n(.*?)```", text, flags=re.S)
    assert example, "README has no Python API example"
    monkeypatch.chdir(tmp_path)  # the example writes cvt13.safetensors
    exec(compile(example.group(1), "README.md", "exec"), {})
    assert (tmp_path / "cvt13.safetensors").stat().st_size > 70_000_000  # 20M fp32 parameters
    assert "cvt_13" in capsys.readouterr().out


def test_every_test_the_docs_cite_exists() -> None:
    cited = {
        (doc.name, *m) for doc in DOCS for m in re.findall(r"tests/(test_\w+\.py)::(\w+)", doc.read_text())
    }
    assert len(cited) > 100  # the robustness table and the README cite tests by name
    missing = [
        (doc, file, name)
        for doc, file, name in sorted(cited)
        if not re.search(rf"^def {name}\(", (REPO / "tests" / file).read_text(), flags=re.M)
    ]
    assert missing == []


def test_every_cvt_command_the_docs_show_takes_its_flags() -> None:
    """Each ``cvt COMMAND --flag ...`` in a code block or inline code of the README and docs names a
    command and options its parser has (options of ``cvt`` itself, such as ``--debug``, too)."""
    parser = build_parser()
    commands = parser.commands
    own = {s for a in parser._actions for s in a.option_strings}
    shown, wrong = 0, []
    for doc in DOCS:
        text = doc.read_text()
        lines = re.findall(r"`(cvt \w+[^`]*)`", text)
        lines += [line.split("#")[0] for block in re.findall(r"```\w*\n(.*?)```", text, flags=re.S)
                  for line in block.splitlines()]  # fmt: skip
        for line in lines:
            match = re.match(r"\s*cvt (\w+)(.*)", line)
            if not match:
                continue
            command, rest = match.groups()
            shown += 1
            if command not in commands:
                wrong.append((doc.name, line))
                continue
            options = own | {s for a in commands[command]._actions for s in a.option_strings}
            wrong += [(doc.name, flag, line) for flag in re.findall(r"(?<![\w-])(--[a-z][\w-]*)", rest)
                      if flag not in options]  # fmt: skip
    assert shown > 30 and wrong == []
