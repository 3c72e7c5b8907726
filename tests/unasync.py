"""Generate the blocking SyncClient (fleetctl/sync.py) from the async Client
(fleetctl/client.py) by token replacement, as httpcore's scripts/unasync.py does, so that the
two clients cannot drift: `make unasync` writes it, `python -m tests.unasync --check` (and
tests/test_unasync.py) fails when it is not current. The output is run through `ruff format`,
since a shorter line may then fit where its async original did not.
"""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent
SOURCE = ROOT / "fleetctl" / "client.py"
TARGET = ROOT / "fleetctl" / "sync.py"

DOCSTRING = '''"""The blocking client of fleetd's control socket, on one blocking connection
(fleetctl.blocking): the same calls as the async Client, for callers without an event loop. It
imports neither asyncio nor anyio.

Generated from fleetctl/client.py by tests/unasync.py (`make unasync`): do not edit it, edit
the async client and regenerate; a test fails when this file is stale.
"""'''

SUBS = [
    (
        r"from fleetctl\.connection import AsyncConnection",
        "from fleetctl.blocking import BlockingConnection",
    ),
    (r"AsyncConnection", "BlockingConnection"),
    (r"AsyncIterator", "Iterator"),
    (r"\bClient\b", "SyncClient"),
    (r"\basync def\b", "def"),
    (r"\bawait ", ""),
    (r"__aenter__", "__enter__"),
    (r"__aexit__", "__exit__"),
    (r"\baclose\b", "close"),
]
_COMPILED = [(re.compile(pattern), replacement) for pattern, replacement in SUBS]


def generate(source: str) -> str:
    """The sync module for the async `source`, formatted. Raises if a substitution found
    nothing to replace (the async source changed shape: update SUBS)."""
    docstring = re.match(r'"""(.*?)"""', source, re.DOTALL)
    if docstring is None:
        raise ValueError("the async client must start with its module docstring")
    body = source[docstring.end() :]
    for pattern, replacement in _COMPILED:
        body, count = pattern.subn(replacement, body)
        if count == 0:
            raise ValueError(f"unasync: {pattern.pattern!r} matched nothing")
    return _format(DOCSTRING + body)


def _format(code: str) -> str:
    """Imports sorted and the code formatted as `make format` would (the names changed)."""
    ruff = str(Path(sys.executable).parent / "ruff")
    stdin = ["--stdin-filename", str(TARGET), "-"]
    for command in (
        [ruff, "check", "--select", "I", "--fix", "--exit-zero", *stdin],
        [ruff, "format", *stdin],
    ):
        code = subprocess.run(
            command, input=code, capture_output=True, text=True, check=True, cwd=ROOT
        ).stdout
    return code


def main(argv: list[str]) -> int:
    expected = generate(SOURCE.read_text())
    if "--check" in argv:
        if TARGET.read_text() != expected:
            print(f"{TARGET} is stale: run `make unasync`", file=sys.stderr)
            return 1
        return 0
    TARGET.write_text(expected)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
