"""protocol/ is data and framing only: it opens no file and no socket, so both programs (and
any other language's client) can take its rules without its side effects. Reading a file is
the caller's part (fleetctl.definitions reads fleet.toml for protocol.definitions.parse_toml)."""

import ast
from pathlib import Path

import pytest

import protocol

MODULES = sorted(Path(protocol.__file__).parent.glob("*.py"))
IO_MODULES = {"io", "pathlib", "shutil", "socket", "subprocess", "tempfile"}
PURE_OS = {"os.path.join"}
"""What protocol may use of os: joining names, which touches nothing."""


def dotted(node: ast.expr) -> str:
    if isinstance(node, ast.Attribute):
        return f"{dotted(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else ""


def io_in(source: str) -> list[str]:
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call):
            called = dotted(node.func)
            if called == "open" or (called.startswith("os.") and called not in PURE_OS):
                found.append((node.lineno, f"{called}()"))
        elif isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
            found.extend(
                (node.lineno, f"import {name}")
                for name in names
                if name and name.split(".")[0] in IO_MODULES
            )
    return [f"line {line}: {what}" for line, what in sorted(found)]


@pytest.mark.parametrize("module", MODULES, ids=lambda path: path.name)
def test_no_protocol_module_does_io(module: Path) -> None:
    assert io_in(module.read_text()) == []


def test_the_check_sees_io() -> None:
    source = "import socket\nimport os\nopen('x')\nos.unlink('x')\nos.path.join('a', 'b')\n"
    assert io_in(source) == ["line 1: import socket", "line 3: open()", "line 4: os.unlink()"]
