"""What fleetd and the holder share as they start (fleetd.core.startup)."""

import resource
import subprocess
import sys

from fleetd.core.startup import leaf_errors


def test_the_leaves_of_nested_groups_are_every_error_in_order() -> None:
    a, b, c = OSError("a"), ValueError("b"), KeyError("c")
    nested = ExceptionGroup("outer", [a, ExceptionGroup("inner", [b, ExceptionGroup("", [c])])])
    assert leaf_errors(nested) == [a, b, c]


def test_an_error_outside_a_group_is_its_own_leaf() -> None:
    error = KeyboardInterrupt()
    assert leaf_errors(error) == [error]


def test_the_fd_limit_is_raised_to_the_hard_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    lowered = min(soft, hard, 256)
    probe = (
        "import resource; from fleetd.core.startup import raise_fd_limit; "
        f"resource.setrlimit(resource.RLIMIT_NOFILE, ({lowered}, {hard})); raise_fd_limit(); "
        "print(*resource.getrlimit(resource.RLIMIT_NOFILE))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], check=False, capture_output=True, text=True
    )
    assert result.stdout.split() == [str(hard), str(hard)], result.stderr
