"""What fleetd and the holder share as they start (fleetd.core.startup)."""

import os
import re
import resource
import subprocess
import sys
import textwrap

import pytest

from fleetd.core.startup import leaf_errors
from tests.processes import FLEETD


def test_the_leaves_of_nested_groups_are_every_error_in_order() -> None:
    a, b, c = OSError("a"), ValueError("b"), KeyError("c")
    nested = ExceptionGroup("outer", [a, ExceptionGroup("inner", [b, ExceptionGroup("", [c])])])
    assert leaf_errors(nested) == [a, b, c]


def test_an_error_outside_a_group_is_its_own_leaf() -> None:
    error = KeyboardInterrupt()
    assert leaf_errors(error) == [error]


def test_the_fd_limit_is_raised_to_the_hard_limit_saying_what_it_was() -> None:
    """What it was is what members get back (fleetd.holder.runenv)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    lowered = min(soft, hard, 256)
    probe = (
        "import resource; from fleetd.core.startup import raise_fd_limit; "
        f"resource.setrlimit(resource.RLIMIT_NOFILE, ({lowered}, {hard})); was = raise_fd_limit(); "
        "print(was, *resource.getrlimit(resource.RLIMIT_NOFILE))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], check=False, capture_output=True, text=True
    )
    assert result.stdout.split() == [str(lowered), str(hard), str(hard)], result.stderr


def test_memory_freed_in_the_middle_of_the_heap_goes_back_to_the_kernel() -> None:
    """20 MB of 2 KB blocks (malloc's, not Python's small-object arenas) freed but for the
    last one, which keeps malloc from trimming the top of its heap by itself."""
    probe = (
        "from fleetd.core.startup import return_free_memory\n"
        "def rss():\n"
        "    with open('/proc/self/statm') as f:\n"
        "        return int(f.read().split()[1])\n"
        "blocks = [bytes(2048) for _ in range(10_000)]\n"
        "last = blocks.pop()\n"
        "del blocks\n"
        "before = rss()\n"
        "return_free_memory()\n"
        "print(before - rss())\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], check=True, capture_output=True, text=True
    )
    freed_pages = int(result.stdout)
    assert freed_pages * resource.getpagesize() > 10 << 20


# --- rich left out (leave_rich_out) ---------------------------------------------------------

LOADED_RICH = re.compile(r"\|\s*(rich\.|pygments)", re.MULTILINE)
"""A module of rich or pygments in -X importtime's lines: rich itself is listed even when its
import is refused, its modules only when it loads."""

BOUND_CLUSTER = textwrap.dedent(
    """
    import fleetctl
    with fleetctl.cluster({"members": {"a": {"command": ["sleep", "60"]}}}) as c:
        c.wait_running()
    """
)


def imports(argv: list[str]) -> str:
    env = {**os.environ, "PYTHONPROFILEIMPORTTIME": "1"}
    done = subprocess.run(argv, check=False, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stderr


@pytest.mark.parametrize(
    "argv",
    [[*FLEETD, "--help"], [sys.executable, "-m", "fleetd.holder", "--help"]],
    ids=["fleetd", "holder"],
)
def test_a_fleetd_program_imports_structlog_without_rich(argv: list[str]) -> None:
    loaded = imports(argv)
    assert "structlog.dev" in loaded and not LOADED_RICH.search(loaded)


def test_a_bound_template_and_its_holders_import_structlog_without_rich() -> None:
    loaded = imports([sys.executable, "-c", BOUND_CLUSTER])
    assert "fleetd.holder.program" in loaded and not LOADED_RICH.search(loaded)
